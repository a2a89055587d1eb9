"""Per-operator figures of a finished Ray Data run, from Ray Data's own stats (the same numbers
`Dataset.stats()` prints): rows and bytes out of each operator, bytes per row, CPU seconds per
row. Used by the benchmark (bytes per page through the object store, CPU per page per stage) and
by the test that bounds the bytes per page."""

from __future__ import annotations

from typing import Any


def operator_stats(ds: Any) -> list[dict[str, Any]]:
    """One dict per operator of `ds` (executed), upstream first: name, output_rows, output_bytes,
    bytes_per_row, cpu_s, cpu_s_per_row, wall_s (sum of task wall times)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def walk(summary: Any) -> None:
        for parent in summary.parents:
            walk(parent)
        for op in summary.operators_stats:
            if op.operator_name in seen:
                continue
            seen.add(op.operator_name)
            rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
            nbytes = int(op.output_size_bytes.sum) if op.output_size_bytes else 0
            cpu = float(op.cpu_time.sum) if op.cpu_time else 0.0
            out.append(
                {
                    "name": op.operator_name,
                    "output_rows": rows,
                    "output_bytes": nbytes,
                    "bytes_per_row": round(nbytes / rows) if rows else 0,
                    "cpu_s": round(cpu, 3),
                    "cpu_s_per_row": round(cpu / rows, 4) if rows else 0.0,
                    "wall_s": round(float(op.wall_time.sum), 3) if op.wall_time else 0.0,
                }
            )

    walk(ds._get_stats_summary())
    return out
