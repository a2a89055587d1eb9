"""Copy the densest part of a PDF corpus (most pages per MB first) into a folder under a size cap.

The device tool carries at most 64 MiB with the Ray/PyMuPDF site archive (~47 MB), so the Ray
pipeline benchmark on the GPU machine runs on such a subset; `jobs.benchmark --corpus` on the same
folder gives the engine-only figure on the same pages (BENCHMARKS.md).

    python -m jobs.corpus_subset --corpus ../shared/corpus/dev --max-mb 10.5 --out .devcorpus
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def pick(corpus: Path, max_bytes: float) -> list[tuple[Path, int]]:
    """(file, pages) of the openable, password-free PDFs, densest first, greedily under the cap."""
    import pymupdf

    rated = []
    for f in sorted(corpus.glob("*.pdf")):
        try:
            with pymupdf.open(f) as doc:
                if doc.needs_pass or doc.page_count == 0:
                    continue
                n = doc.page_count
        except Exception:  # noqa: BLE001 - unreadable files are simply not picked
            continue
        rated.append((n / (f.stat().st_size / 1e6), n, f))
    out, total = [], 0
    for _, n, f in sorted(rated, reverse=True):
        if total + f.stat().st_size <= max_bytes:
            total += f.stat().st_size
            out.append((f, n))
    return out


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # module docstring is present
    ap = argparse.ArgumentParser(prog="python -m jobs.corpus_subset", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/corpus/dev")
    ap.add_argument("--max-mb", type=float, default=10.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    chosen = pick(Path(args.corpus), args.max_mb * 1e6)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f, _ in chosen:
        shutil.copy2(f, out / f.name)
    print(
        f"{len(chosen)} PDFs, {sum(n for _, n in chosen)} pages, "
        f"{sum(f.stat().st_size for f, _ in chosen) / 1e6:.1f} MB -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
