"""A no-op nightly rerun over N unchanged documents on a real S3 server (moto, issue 16).

    python -m jobs.bench_noop --docs 10000 [--json-out x.json] [--log-out rerun.log]

1. Starts moto's server (`python -m moto.server`, its own process on 127.0.0.1) with its request
   recorder, and two buckets (input, output).
2. A real first run (`python -m pipeline.run model=tiny_random mode=tiny`, CPU) over one real PDF:
   it leaves what a night leaves (pages, ledger, snapshot, stat cache, documents, _sources).
3. N more inputs are PUT concurrently (that PDF's bytes plus a unique trailing comment: distinct documents of
   one page), and the state a first run over them would have left is written with the real
   writers, not OCR'd (the bench is about the rerun): stat-cache entries from the real listing
   (`expand_input_stats`, `StatCache.add`), their rows in pages parts of 64 rows with ledger parts
   (`OutputStore.write_parquet`, `commit_entry`, from a thread pool), `_sources/` (`record_sources`) and a ledger
   snapshot (`Ledger.write_snapshot`).
4. The measured rerun: the same command as step 2 over all N+1 inputs, with the recorder on. It
   reports the job's wall time (process start to exit, Ray start-up included), the driver's own
   `wall_time_s`, the input GETs (requests for one input object, method GET) and all requests by
   method and prefix ("input"/"output": requests under a bucket's keys; "other": requests on a
   bucket itself, i.e. the listings of both buckets). JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
SEED_PDF = REPO / "tests" / "data" / "cjk-ja-vertical-01.pdf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(endpoint: str, what: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/recorder/{what}", method="POST", data=b"")
    urllib.request.urlopen(req).read()


def _requests(endpoint: str) -> list[tuple[str, str, str]]:
    text = urllib.request.urlopen(f"{endpoint}/moto-api/recorder/download-recording").read().decode()
    out: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        e = json.loads(line)
        url = urlparse(e["url"])
        out.append((e["method"], url.path.lstrip("/"), url.query))
    return out


def _job(so: dict[str, str], src: str, out: str) -> tuple[subprocess.CompletedProcess[str], float]:
    opts = [f"+{side}.storage_options.{k}='{v}'" for side in ("input", "output") for k, v in so.items()]
    cmd = [
        sys.executable,
        "-m",
        "pipeline.run",
        "model=tiny_random",
        "progress=false",
        "mode=tiny",
        "generation.max_new_tokens=4",
        f"input.uri={src}",
        f"output.uri={out}",
        *opts,
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", RAY_ADDRESS="local")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for _ in range(3):  # Ray's node start-up has a fixed 30 s limit: on a loaded machine, again
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
        if "timed out during startup" not in p.stderr:
            break
        print("ray start-up timed out (machine loaded): retrying", file=sys.stderr)
    return p, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--json-out", default="")
    ap.add_argument("--log-out", default="", help="keep the measured rerun's log (stderr) here")
    args = ap.parse_args()

    import s3fs

    tmp = tempfile.mkdtemp(prefix="bench-noop-")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MOTO_RECORDER_FILEPATH=f"{tmp}/recording.jsonl")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/").read()
                break
            except Exception:
                time.sleep(0.2)
        so = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        fs: Any = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            key="testing",
            secret="testing",
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        fs.mkdir("bench-in")
        fs.mkdir("bench-out")
        src, out = "s3://bench-in/in", "s3://bench-out/out"
        seed = SEED_PDF.read_bytes()
        fs.pipe("bench-in/in/seed.pdf", seed)
        first, first_s = _job(so, src, out)
        assert first.returncode == 0, first.stderr[-3000:]
        t_setup = time.perf_counter()
        phases = _synthesize(fs, so, src, out, seed, args.docs)
        setup_s = time.perf_counter() - t_setup

        _post(endpoint, "reset-recording")
        _post(endpoint, "start-recording")
        again, wall = _job(so, src, out)
        _post(endpoint, "stop-recording")
        if args.log_out:
            Path(args.log_out).write_text(again.stderr)
        assert again.returncode == 0, again.stderr[-3000:]
        reqs = _requests(endpoint)
        fs.invalidate_cache()
        summary = json.loads(fs.cat_file("bench-out/out/_summary.json"))
        by: Counter[str] = Counter()
        for m, path, query in reqs:
            where = (
                "input"
                if path.startswith("bench-in/")
                else "output"
                if path.startswith("bench-out/")
                else "other"
            )
            kind = (
                "list"
                if query.startswith("list") or path.rstrip("/") in ("bench-in", "bench-out")
                else "object"
            )
            by[f"{where} {kind} {m}"] += 1
        input_gets = sum(
            1 for m, p, q in reqs if m == "GET" and p.startswith("bench-in/in/") and not q.startswith("list")
        )
        result = {
            "bench": "noop_rerun_moto",
            "documents": args.docs + 1,
            "job_wall_s": round(wall, 1),
            "driver_wall_time_s": summary["wall_time_s"],
            "input_object_gets": input_gets,
            "requests": dict(sorted(by.items())),
            "rows_written": summary["rows_written"],
            "rows_already_final": summary["rows_already_final"],
            "documents_in": summary["documents_in"],
            "accounting_ok": summary["accounting_ok"],
            "first_run_wall_s": round(first_s, 1),
            "synthesize_s": round(setup_s, 1),
            "synthesize_phases_s": phases,
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": os.getloadavg()[0],
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


def _synthesize(
    fs: Any, so: dict[str, str], src: str, out: str, seed: bytes, n: int, threads: int = 16
) -> dict[str, float]:
    """The state a first run over the N synthetic inputs would leave, with the real writers.
    Independent PUTs go out concurrently (s3fs's batched `pipe`, then `threads` threads committing
    parts): only the set-up is faster, the objects and the state are the same. Returns the
    seconds of each phase."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from pipeline.ledger import Ledger, commit_entry
    from pipeline.outputs import OutputStore
    from pipeline.schema import rows_to_table
    from pipeline.sources import content_id, expand_input_stats
    from pipeline.statcache import StatCache

    phases: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = round(now - t, 1)
        t = now

    blobs = {f"bench-in/in/syn/{i:07d}.pdf": seed + f"\n% bench {i}\n".encode() for i in range(n)}
    keys = list(blobs)
    for a in range(0, n, 5000):
        fs.pipe({k: blobs[k] for k in keys[a : a + 5000]}, batch_size=threads * 4)
    lap("put_inputs_s")
    store = OutputStore(out, so)
    summary = json.loads(fs.cat_file("bench-out/out/_summary.json"))
    h = summary["config_hash"]
    cache = StatCache.load(store)
    (seed_row,) = cache.table.to_pylist()
    listed = dict(expand_input_stats(src, so, suffixes=[".pdf"]))
    lap("list_inputs_s")
    rows: list[dict[str, Any]] = []
    for k, data in blobs.items():
        uri = f"s3://{k}"
        size, stamp = listed[uri]  # pyright: ignore[reportGeneralTypeIssues]
        rows.append(
            {
                **seed_row,
                "source_uri": uri,
                "size": size,
                "stamp": stamp,
                "doc_id": content_id(data),
            }
        )
    del blobs
    live = [(u, *st) for u, st in listed.items() if st is not None]
    live_keys = pa.table(
        {
            "source_uri": pa.array([k[0] for k in live], pa.string()),
            "size": pa.array([k[1] for k in live], pa.int64()),
            "stamp": pa.array([k[2] for k in live], pa.string()),
        }
    )
    cache.add(pa.Table.from_pylist(rows), live=live_keys)
    lap("stat_cache_s")
    pages = [
        {
            "doc_id": r["doc_id"],
            "source_uri": r["source_uri"],
            "page_index": 0,
            "status": "ok",
            "config_hash": h,
            "markdown": "synthetic",
        }
        for r in rows
    ]

    def commit(a: int) -> None:
        table = rows_to_table(pages[a : a + 64])
        commit_entry(store, table, store.write_parquet("pages", table))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(commit, range(0, len(pages), 64)))
    lap("commit_parts_s")
    led = Ledger.load(store, h)
    led.record_sources(store, {(r["doc_id"], r["source_uri"]) for r in rows})
    Ledger.write_snapshot(store)
    lap("sources_and_snapshot_s")
    return phases


if __name__ == "__main__":
    main()
