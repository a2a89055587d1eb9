"""A report of a run: HTML with PNG plots (matplotlib, Agg backend: no display needed).

    python -m pipeline.report OUTPUT [--out DIR] [--worst 20] [--config-hash H|all] [--storage-options JSON]

Writes `index.html` and `status.png`, `throughput.png`, `tokens.png`, `compression.png`,
`agreement.png` into DIR (default `<OUTPUT>/_report/`, any fsspec URI): pages by status,
throughput over time (from `written_at`), output-token and compression-ratio distributions,
text-layer agreement with the worst pages listed (each with its `pipeline.inspect` command).
Reads `pages/` (only the small columns) and, when present, `_summary.json`. `--storage-options`
are OUTPUT's fsspec options (as the job's `output.storage_options`); DIR gets them too when it is
on the same kind of store.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import sys
from typing import Any

import numpy as np

from pipeline.arrow import pc
from pipeline.cli import add_storage_options, parse_storage_options
from pipeline.outputs import OutputStore
from pipeline.quality import OCR_STATUSES
from pipeline.schema import PAGE_SIGNALS, STATUSES, Status

COLUMNS = (
    "doc_id",
    "source_uri",
    "page_index",
    "status",
    "error_code",
    *PAGE_SIGNALS,
    "render_ms",
    "ocr_ms",
    "written_at",
    "config_hash",
)
TEXT_COLUMNS = ("doc_id", "source_uri", "status", "error_code", "finish_reason", "config_hash")
PLOTS = ("status", "throughput", "tokens", "compression", "agreement")
STATUS_COLOURS: dict[str, str] = {
    Status.ok: "#2e8b57",
    Status.truncated: "#e6a700",
    Status.repetition: "#d2691e",
    Status.render_error: "#b22222",
    Status.ocr_error: "#8b0000",
    Status.doc_error: "#708090",
}
# DeepSeek-OCR paper (Fox benchmark): ~97% decoding precision below 10x, ~60% at 20x.
PAPER_RATIOS = ((10.0, "10x: ~97% precision"), (20.0, "20x: ~60%"))


class ReportError(RuntimeError):
    pass


def load_rows(store: OutputStore, config_hash: str | None) -> dict[str, np.ndarray]:
    """The report's columns of `pages/` (one configuration, or all when None) as numpy arrays."""
    from pipeline.documents import pages_dataset

    pages = pages_dataset(store)
    if pages is None:
        raise ReportError(f"no pages/ under {store.root}")
    flt = None if config_hash is None else pc.field("config_hash") == config_hash
    table = pages.to_table(columns=list(COLUMNS), filter=flt)
    if table.num_rows == 0:
        raise ReportError(
            f"no rows{'' if config_hash is None else f' of configuration {config_hash}'} "
            f"under {store.root}/pages"
        )
    out: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        col = table.column(name)
        if name == "written_at":
            out[name] = np.array([np.nan if v is None else v / 1000.0 for v in col.cast("int64").to_pylist()])
        elif name in TEXT_COLUMNS:
            out[name] = np.array(col.to_pylist(), dtype=object)
        else:
            out[name] = np.array([np.nan if v is None else v for v in col.to_pylist()], dtype=float)
    return out


# ----------------------------------------------------------------------------- plots


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display, whatever MPLBACKEND says
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    return fig, ax


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _empty(ax: Any, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_status(rows: dict[str, np.ndarray]) -> bytes:
    fig, ax = _figure("rows by status")
    counts = [int(np.sum(rows["status"] == s)) for s in STATUSES]
    bars = ax.barh(list(STATUSES), counts, color=[STATUS_COLOURS[s] for s in STATUSES])
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.set_xlabel("rows", fontsize=8)
    ax.set_xlim(0, max(counts) * 1.15 + 1)
    return _png(fig)


def plot_throughput(rows: dict[str, np.ndarray]) -> bytes:
    fig, ax = _figure("throughput over time (rows committed by the writer)")
    t = rows["written_at"]
    t = np.sort(t[~np.isnan(t)])
    if t.size == 0:
        _empty(ax, "no timing data (rows without written_at)")
        return _png(fig)
    rel = t - t[0]
    span = max(float(rel[-1]), 1.0)
    unit, scale = ("min", 60.0) if span > 300 else ("s", 1.0)
    bins = int(min(40, max(1, np.unique(t).size)))
    counts, edges = np.histogram(rel / scale, bins=bins, range=(0.0, span / scale))
    width = edges[1] - edges[0]
    ax.bar(edges[:-1], counts / width, width=width, align="edge", color="#4682b4", alpha=0.8)
    ax.set_xlabel(f"time since first row ({unit})", fontsize=8)
    ax.set_ylabel(f"rows / {unit}", fontsize=8)
    ax2 = ax.twinx()
    ax2.step(
        np.append(rel / scale, span / scale),
        np.append(np.arange(1, t.size + 1), t.size),
        where="post",
        color="#222",
        linewidth=1,
    )
    ax2.set_ylabel("cumulative rows", fontsize=8)
    ax2.tick_params(labelsize=8)
    ax2.set_ylim(0, t.size * 1.05)
    return _png(fig)


def _hist(title: str, values: np.ndarray, xlabel: str, empty: str, log: bool = False) -> tuple[Any, Any]:
    fig, ax = _figure(title)
    v = values[~np.isnan(values)]
    if v.size == 0:
        _empty(ax, empty)
        return fig, ax
    ax.hist(v, bins=min(40, max(1, np.unique(v).size)), color="#6a5acd", alpha=0.85)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("pages", fontsize=8)
    if log:
        ax.set_yscale("log")
    med = float(np.median(v))
    ax.axvline(med, color="#222", linestyle=":", linewidth=1)
    ax.text(
        0.98,
        0.95,
        f"n={v.size}  median={med:.3g}  p95={np.percentile(v, 95):.3g}",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
    )
    return fig, ax


def _ocr(rows: dict[str, np.ndarray], name: str) -> np.ndarray:
    return rows[name][np.isin(rows["status"], OCR_STATUSES)]


def plot_tokens(rows: dict[str, np.ndarray]) -> bytes:
    fig, _ = _hist(
        "output tokens per page",
        _ocr(rows, "num_output_tokens"),
        "generated tokens (EOS excluded)",
        "no pages with model output",
    )
    return _png(fig)


def plot_compression(rows: dict[str, np.ndarray]) -> bytes:
    v = _ocr(rows, "compression_ratio")
    fig, ax = _hist(
        "optical compression: text tokens / vision tokens",
        v,
        "compression ratio",
        "no pages with model output",
    )
    v = v[~np.isnan(v)]
    if v.size and v.max() >= 5:
        for x, label in PAPER_RATIOS:
            ax.axvline(x, color="#b22222", linewidth=1)
            ax.text(x, 0.8, f" {label}", color="#b22222", fontsize=7, transform=ax.get_xaxis_transform())
    return _png(fig)


def plot_agreement(rows: dict[str, np.ndarray]) -> bytes:
    fig, ax = _hist(
        "agreement with the PDF text layer (1 - normalised edit distance)",
        _ocr(rows, "text_layer_agreement"),
        "agreement",
        "no OCR pages with a PDF text layer",
    )
    if _ocr(rows, "text_layer_agreement").size:
        ax.set_xlim(-0.02, 1.02)
    return _png(fig)


# ----------------------------------------------------------------------------- html


def worst_pages(rows: dict[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    score = rows["text_layer_agreement"]
    idx = [i for i in np.argsort(score, kind="stable") if not np.isnan(score[i])][:n]
    return [{k: rows[k][i] for k in COLUMNS} for i in idx]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return html.escape(str(v))


def render_html(
    rows: dict[str, np.ndarray],
    summary: dict[str, Any] | None,
    worst: list[dict[str, Any]],
    output: str,
    config_hash: str | None,
) -> str:
    n = rows["status"].size
    ocr = np.isin(rows["status"], OCR_STATUSES)
    facts = [
        ("output", output),
        ("configuration", config_hash or "all"),
        ("rows", n),
        ("documents", len(set(rows["doc_id"]))),
        ("pages with model output", int(ocr.sum())),
    ]
    if summary:
        facts += [
            ("model", summary.get("config", {}).get("model", {}).get("name")),
            ("mode", summary.get("config", {}).get("mode", {}).get("name")),
            ("last run: wall time (s)", summary.get("wall_time_s")),
            ("last run: pages/s", summary.get("pages_per_s")),
            ("last run: accounting", "ok" if summary.get("accounting_ok") else "FAILED"),
        ]
    for name, label in (("render_ms", "median render ms/page"), ("ocr_ms", "median OCR ms/page")):
        v = rows[name][~np.isnan(rows[name])]
        facts.append((label, f"{np.median(v):.1f}" if v.size else "–"))
    status_rows = "".join(
        f"<tr><td>{s}</td><td>{int(np.sum(rows['status'] == s))}</td></tr>" for s in STATUSES
    )
    worst_rows = (
        "".join(
            "<tr>"
            + "".join(
                f"<td>{c}</td>"
                for c in (
                    i + 1,
                    _fmt(w["text_layer_agreement"]),
                    _fmt(w["status"]),
                    _fmt(w["finish_reason"]),
                    _fmt(w["repetition_score"]),
                    _fmt(w["compression_ratio"]),
                    _fmt(w["num_output_tokens"]),
                    html.escape(str(w["source_uri"]).rsplit("/", 1)[-1]),
                    int(w["page_index"]),
                    f"<code>python -m pipeline.inspect {html.escape(output)} --doc {html.escape(str(w['doc_id']))} "
                    f"--page {int(w['page_index'])}</code>",
                )
            )
            + "</tr>"
            for i, w in enumerate(worst)
        )
        or '<tr><td colspan="10">no OCR pages with a PDF text layer</td></tr>'
    )
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in facts)
    img = "".join(f'<img src="{p}.png" alt="{p}">' for p in PLOTS[:4])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pagemill report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}
table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}} img{{margin:4px;border:1px solid #eee}}
code{{font-size:12px}}</style></head><body>
<h1>pagemill report</h1>
<table>{fact_rows}</table>
<h2>Rows by status</h2><table><tr><th>status</th><th>rows</th></tr>{status_rows}</table>
<h2>Plots</h2><div>{img}</div>
<h2>Worst pages by text-layer agreement</h2>
<img src="agreement.png" alt="agreement">
<table><tr><th>#</th><th>agreement</th><th>status</th><th>finish</th><th>repetition</th><th>compression</th>
<th>output tokens</th><th>file</th><th>page</th><th>look at it</th></tr>{worst_rows}</table>
</body></html>
"""


def write_report(
    output: str,
    out: str | None = None,
    *,
    worst: int = 20,
    config_hash: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write the report; returns the path of index.html. `config_hash`: None = the last run's
    configuration (from _summary.json, else every row), "all" = every row. `storage_options`:
    OUTPUT's fsspec options, also used for `out` when it has OUTPUT's protocol."""
    import fsspec

    from pipeline.documents import last_config_hash

    store = OutputStore(output, storage_options, create=False)
    summary = None
    if store.fs.exists(store.join("_summary.json")):
        with store.fs.open(store.join("_summary.json"), "rb") as f:
            summary = json.load(f)
    chosen = None if config_hash == "all" else (config_hash or last_config_hash(store))
    rows = load_rows(store, chosen)
    if out is None:
        dest = OutputStore(store.uri.rstrip("/") + "/_report", store.storage_options)
    else:
        same = fsspec.core.split_protocol(out)[0] == fsspec.core.split_protocol(output)[0]
        dest = OutputStore(out, store.storage_options if same else None)
    plots = {
        "status": plot_status,
        "throughput": plot_throughput,
        "tokens": plot_tokens,
        "compression": plot_compression,
        "agreement": plot_agreement,
    }
    for name in PLOTS:
        blob = plots[name](rows)
        dest.write_bytes(f"{name}.png", blob)
    page = render_html(rows, summary, worst_pages(rows, worst), store.root, chosen).encode()
    return dest.write_bytes("index.html", page)


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # module docstring is present
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the run's output.uri")
    p.add_argument("--out", help="report directory (default: OUTPUT/_report)")
    p.add_argument("--worst", type=int, default=20, help="pages listed by lowest text-layer agreement")
    p.add_argument(
        "--config-hash", help="configuration to report (default: the last run's; 'all': every row)"
    )
    add_storage_options(p)
    args = p.parse_args(argv)
    so = parse_storage_options(p, args.storage_options)
    try:
        path = write_report(
            args.output, args.out, worst=args.worst, config_hash=args.config_hash, storage_options=so
        )
    except ReportError as e:
        print(f"pagemill report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
