"""The stat cache: a rerun over unchanged inputs on a real S3 server (moto) sends no GET for any
input object (counted by moto's own server-side request recorder), a changed input is read and
hashed again (and only it), `input.rehash=true` reads every input, and a corrupt or missing
cache only costs a rehash."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pytest

from tests.pipeline.e2e.helpers import run_job

DOCS = ("form-libreoffice-01.pdf", "not-a-pdf-01.pdf", "cjk-zh-text-01.pdf")


def _row(uri: str, stamp: str, doc_id: str = "d1") -> dict[str, Any]:
    return {
        "source_uri": uri,
        "size": 10,
        "stamp": stamp,
        "doc_id": doc_id,
        "page_count": 1,
        "error_code": "",
        "error": "",
        "password": "",
    }


def _table(*rows: dict[str, Any]) -> pa.Table:
    """Probe outcomes as `StatCache.add` takes them (SCHEMA's columns and `password`)."""
    from pipeline.statcache import SCHEMA

    fields = [*SCHEMA, pa.field("password", pa.string())]
    return pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in fields})


def _entries(cache: Any) -> dict[tuple[str, int, str], dict[str, Any]]:
    """The cache's rows by (source_uri, size, stamp)."""
    return {(r["source_uri"], r["size"], r["stamp"]): r for r in cache.table.to_pylist()}


def test_cache_round_trip_skips_what_it_must_not_keep(tmp_path: Path) -> None:
    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache

    store = OutputStore(str(tmp_path / "out"))
    cache = StatCache.load(store)  # missing: empty, no error
    assert cache.table.num_rows == 0
    rows = _table(
        _row("file:///a.pdf", "etag:1"),
        {**_row("file:///b.pdf", "etag:2"), "error_code": "read_error"},  # may be transient
        {**_row("file:///c.pdf", "etag:3"), "password": "pw"},  # a password applies
        {**_row("file:///d.pdf", "etag:4"), "error_code": "not_a_pdf"},  # bytes decide it
    )
    assert cache.add(rows, live=_listing()) == 2
    assert cache.add(rows, live=_listing()) == 0  # nothing new: no second part
    again = _entries(StatCache.load(store))
    assert set(again) == {("file:///a.pdf", 10, "etag:1"), ("file:///d.pdf", 10, "etag:4")}
    assert again["file:///a.pdf", 10, "etag:1"]["doc_id"] == "d1"
    assert len(list((tmp_path / "out" / CACHE_DIR).glob("part-*.parquet"))) == 1


def test_corrupt_part_is_skipped_and_only_costs_a_rehash(tmp_path: Path) -> None:
    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache

    store = OutputStore(str(tmp_path / "out"))
    StatCache.load(store).add(_table(_row("file:///a.pdf", "etag:1")), live=_listing())
    StatCache.load(store).add(_table(_row("file:///b.pdf", "etag:2")), live=_listing())
    parts = sorted((tmp_path / "out" / CACHE_DIR).glob("part-*.parquet"))
    assert len(parts) == 2
    parts[0].write_bytes(b"not parquet at all")
    loaded = StatCache.load(store)
    assert len(_entries(loaded)) == 1  # the other part still serves


def test_consolidation_keeps_the_live_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.statcache as sc
    from pipeline.outputs import OutputStore

    monkeypatch.setattr(sc, "MAX_PARTS", 3)
    store = OutputStore(str(tmp_path / "out"))
    for i in range(3):
        sc.StatCache.load(store).add(_table(_row(f"file:///{i}.pdf", "etag:x")), live=_listing())
    live = {("file:///0.pdf", 10, "etag:x"), ("file:///3.pdf", 10, "etag:x")}
    sc.StatCache.load(store).add(_table(_row("file:///3.pdf", "etag:x")), live=_listing(*sorted(live)))
    assert len(list((tmp_path / "out" / sc.CACHE_DIR).glob("part-*.parquet"))) == 1
    assert set(_entries(sc.StatCache.load(store))) == live


def test_rehash_that_contradicts_an_entry_replaces_it(tmp_path: Path) -> None:
    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache

    store = OutputStore(str(tmp_path / "out"))
    StatCache.load(store).add(
        _table(_row("file:///a.pdf", "etag:1"), _row("file:///b.pdf", "etag:2")), live=_listing()
    )
    key = ("file:///a.pdf", 10, "etag:1")
    StatCache.load(store).add(_table(_row("file:///a.pdf", "etag:1", doc_id="d2")), live=_listing(key))
    assert len(list((tmp_path / "out" / CACHE_DIR).glob("part-*.parquet"))) == 1
    assert _entries(StatCache.load(store))[key]["doc_id"] == "d2"


# ----------------------------------------------------------------------------- the Arrow split


def _listing(*rows: tuple[str, int | None, str | None]) -> pa.Table:
    from pipeline.sources import LISTING_SCHEMA

    return pa.table(
        {
            "source_uri": [r[0] for r in rows],
            "size": pa.array([r[1] for r in rows], pa.int64()),
            "stamp": pa.array([r[2] for r in rows], pa.string()),
        },
        schema=LISTING_SCHEMA,
    )


def _cache_table(*rows: dict[str, Any]) -> pa.Table:
    from pipeline.statcache import SCHEMA

    return pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in rows], schema=SCHEMA)


def test_split_listing_hits_misses_and_changed_versions() -> None:
    from pipeline.schema import DISCOVERED_SCHEMA
    from pipeline.statcache import split_listing

    cache = _cache_table(
        _row("s3://b/hit.pdf", "etag:1", "d-hit"),
        {**_row("s3://b/err.pdf", "etag:2", "d-err"), "error_code": "not_a_pdf", "error": "no"},
        _row("s3://b/new-stamp.pdf", "etag:old"),
        _row("s3://b/new-size.pdf", "etag:4"),
        _row("s3://b/null.pdf", "etag:5"),
        _row("s3://b/gone.pdf", "etag:6"),
    )
    listing = _listing(
        ("s3://b/err.pdf", 10, "etag:2"),
        ("s3://b/hit.pdf", 10, "etag:1"),
        ("s3://b/miss.pdf", 10, "etag:3"),
        ("s3://b/new-size.pdf", 11, "etag:4"),
        ("s3://b/new-stamp.pdf", 10, "etag:new"),
        ("s3://b/null.pdf", None, None),  # a list-file entry whose HEAD failed
    )
    cached, todo = split_listing(listing, cache)
    assert cached.schema.equals(DISCOVERED_SCHEMA)
    assert cached.to_pylist() == [  # in listing order
        {
            "source_uri": "s3://b/err.pdf",
            "doc_id": "d-err",
            "page_count": 1,
            "error_code": "not_a_pdf",
            "error": "no",
            "password": "",
        },
        {
            "source_uri": "s3://b/hit.pdf",
            "doc_id": "d-hit",
            "page_count": 1,
            "error_code": "",
            "error": "",
            "password": "",
        },
    ]
    assert todo.to_pylist() == [
        "s3://b/miss.pdf",
        "s3://b/new-size.pdf",
        "s3://b/new-stamp.pdf",
        "s3://b/null.pdf",
    ]
    # a uri cached in several versions (the cache keeps every listed one until a rewrite), one
    # of them twice (a key in two parts): the listed version is one hit
    versions = _cache_table(
        _row("s3://b/v.pdf", "etag:a", "d-a"),
        _row("s3://b/v.pdf", "etag:b", "d-b"),
        _row("s3://b/w.pdf", "etag:c", "d-c"),
        _row("s3://b/v.pdf", "etag:b", "d-b"),
    )
    cached, todo = split_listing(
        _listing(
            ("s3://b/v.pdf", 10, "etag:b"), ("s3://b/w.pdf", 10, "etag:c"), ("s3://b/x.pdf", 10, "etag:a")
        ),
        versions,
    )
    assert cached.column("doc_id").to_pylist() == ["d-b", "d-c"] and todo.to_pylist() == ["s3://b/x.pdf"]
    # rehash, no cache, an empty cache: every listed uri is probed
    uris = listing.column("source_uri").to_pylist()
    for args in ((cache, True), (None, False), (cache.slice(0, 0), False)):
        cached, todo = split_listing(listing, *args)
        assert cached.num_rows == 0 and cached.schema.equals(DISCOVERED_SCHEMA)
        assert todo.to_pylist() == uris


def test_split_listing_probes_password_documents_every_run() -> None:
    from pipeline.statcache import split_listing

    cache = _cache_table(
        _row("s3://b/x/by-id.pdf", "etag:1", "d-secret"),
        _row("s3://b/x/by-name.pdf", "etag:2", "d-2"),
        _row("s3://b/x/plain.pdf", "etag:3", "d-3"),
        _row("s3://b/x/empty-pw.pdf", "etag:4", "d-4"),
    )
    listing = _listing(
        ("s3://b/x/by-id.pdf", 10, "etag:1"),
        ("s3://b/x/by-name.pdf", 10, "etag:2"),
        ("s3://b/x/empty-pw.pdf", 10, "etag:4"),
        ("s3://b/x/plain.pdf", 10, "etag:3"),
    )
    pw = {"d-secret": "pw1", "by-name.pdf": "pw2", "empty-pw.pdf": "", "x": "pw3"}
    cached, todo = split_listing(listing, cache, passwords=pw)
    assert cached.column("source_uri").to_pylist() == ["s3://b/x/empty-pw.pdf", "s3://b/x/plain.pdf"]
    assert todo.to_pylist() == ["s3://b/x/by-id.pdf", "s3://b/x/by-name.pdf"]


def test_add_takes_tables_and_consolidation_keeps_listed_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.statcache as sc
    from pipeline.outputs import OutputStore

    monkeypatch.setattr(sc, "MAX_PARTS", 2)
    store = OutputStore(str(tmp_path / "out"))
    rows = pa.Table.from_pylist([_row(f"file:///{i}.pdf", "etag:x", f"d{i}") for i in range(4)])
    assert sc.StatCache.load(store).add(rows.slice(0, 2), live=_listing()) == 2
    assert sc.StatCache.load(store).add(rows.slice(2, 1), live=_listing()) == 1
    cache = sc.StatCache.load(store)
    assert cache.add(rows.slice(0, 3), live=_listing()) == 0  # nothing new: nothing written
    assert len(cache.parts) == 2 and cache.table.num_rows == 3
    # a third part would pass MAX_PARTS: one part of the listed keys (1.pdf's size changed)
    listed = _listing(
        ("file:///1.pdf", 99, "etag:x"), ("file:///2.pdf", 10, "etag:x"), ("file:///3.pdf", 10, "etag:x")
    )
    assert cache.add(rows.slice(3, 1), live=listed) == 1
    parts = list((tmp_path / "out" / sc.CACHE_DIR).glob("part-*.parquet"))
    assert len(parts) == 1
    again = sc.StatCache.load(store)
    assert set(_entries(again)) == {("file:///2.pdf", 10, "etag:x"), ("file:///3.pdf", 10, "etag:x")}
    assert again.table.column("source_uri").to_pylist() == ["file:///2.pdf", "file:///3.pdf"]
    # the part's name is its keys' digest, as the dict-based writer named it
    import hashlib

    blob = b"file:///2.pdf\t10\tetag:x\nfile:///3.pdf\t10\tetag:x"
    assert parts[0].name == f"part-{hashlib.sha256(blob).hexdigest()[:20]}.parquet"


def test_a_key_in_two_parts_is_one_entry(tmp_path: Path) -> None:
    """A crash between a rewrite and the removal of the old parts leaves a key in two parts."""
    import shutil

    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache, split_listing

    store = OutputStore(str(tmp_path / "out"))
    StatCache.load(store).add(
        _table(_row("file:///a.pdf", "etag:1"), _row("file:///b.pdf", "etag:2")), live=_listing()
    )
    (part,) = (tmp_path / "out" / CACHE_DIR).glob("part-*.parquet")
    shutil.copy(part, part.with_name("part-00000000000000000000.parquet"))
    cache = StatCache.load(store)
    assert len(cache.parts) == 2 and len(_entries(cache)) == 2
    cached, todo = split_listing(_listing(("file:///a.pdf", 10, "etag:1")), cache.table)
    assert cached.num_rows == 1 and len(todo) == 0


def test_discover_listed_merges_probed_rows_in_listing_order(tmp_path: Path) -> None:
    """The driver's side of discovery without Ray: hits from the cache, the rest probed (here by
    a stand-in for the Ray Data pool) and cached for the next run."""
    from pipeline.config import PipelineConfig
    from pipeline.discover import discover_listed
    from pipeline.outputs import OutputStore
    from pipeline.schema import DISCOVERED_SCHEMA, discovered_table

    store = OutputStore(str(tmp_path / "out"))
    cfg = PipelineConfig()
    cfg.input.passwords = {"locked.pdf": "pw"}
    listing = _listing(*((f"file:///{n}.pdf", 10, f"etag:{n}") for n in ("a", "b", "c", "locked")))
    probed: list[list[str]] = []

    def probe(uris: pa.Array) -> pa.Table:
        probed.append(uris.to_pylist())
        return discovered_table(
            [
                {
                    "source_uri": u,
                    "doc_id": "id-" + u[8:],
                    "page_count": 2,
                    "error_code": "",
                    "error": "",
                    "password": "pw" if "locked" in u else "",
                }
                for u in reversed(uris.to_pylist())  # the pool gives no order
            ]
        )

    first = discover_listed(cfg, listing, store, probe)
    assert first.schema.equals(DISCOVERED_SCHEMA)
    assert first.column("source_uri").to_pylist() == listing.column("source_uri").to_pylist()
    again = discover_listed(cfg, listing, store, probe)
    assert again.to_pylist() == first.to_pylist()
    assert probed == [listing.column("source_uri").to_pylist(), ["file:///locked.pdf"]]
    cfg.input.rehash = True
    discover_listed(cfg, listing, store, probe)
    assert probed[-1] == listing.column("source_uri").to_pylist()


def test_listing_table_is_the_listing_as_arrow(tmp_path: Path) -> None:
    from pipeline.discover import with_stats
    from pipeline.sources import LISTING_SCHEMA, expand_input_stats, listing_table, stat_table

    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.pdf").write_bytes(b"%PDF-1 " + bytes([i]))
    (tmp_path / "list.txt").write_text("\n".join(str(tmp_path / "in" / f"{i}.pdf") for i in range(2)))
    t = listing_table(str(tmp_path / "in"))
    assert t.schema.equals(LISTING_SCHEMA)
    listed = expand_input_stats(str(tmp_path / "in"))
    assert [(r["source_uri"], (r["size"], r["stamp"])) for r in t.to_pylist()] == listed
    listed_file = listing_table(str(tmp_path / "list.txt"))  # not stat'ed while listing: nulls
    assert listed_file.num_rows == 2 and listed_file.column("stamp").null_count == 2
    # discovery's HEADs (stat_table, in Ray workers) fill them in, in listing order
    mixed = pa.concat_tables([listed_file, t.slice(2), _listing(("file:///nowhere/x.pdf", None, None))])
    unstated = [
        u
        for u, st in zip(mixed.column("source_uri").to_pylist(), mixed.column("stamp").to_pylist())
        if st is None
    ]
    filled = with_stats(mixed, stat_table(unstated))
    assert filled.schema.equals(LISTING_SCHEMA)
    assert filled.slice(0, 3).to_pylist() == t.to_pylist()
    assert filled.slice(3).to_pylist() == [
        {"source_uri": "file:///nowhere/x.pdf", "size": None, "stamp": None}
    ]


def test_list_file_entries_are_stated_like_the_listing(root_and_files) -> None:
    from pipeline.sources import expand_input_stats, stat_many

    spec, opts = root_and_files
    listed = expand_input_stats(spec, opts)
    assert all(st is not None for _, st in listed)
    assert stat_many([u for u, _ in listed] + [spec + "/missing.pdf"], opts) == [st for _, st in listed] + [
        None
    ]


@pytest.fixture(params=["file", "s3"])
def root_and_files(request, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if request.param == "file":
        (tmp_path / "in").mkdir()
        for i in range(3):
            (tmp_path / "in" / f"{i}.pdf").write_bytes(b"%PDF-1 " + bytes([i]))
        return f"file://{tmp_path / 'in'}", {}
    bucket, fs, so = request.getfixturevalue("s3_bucket")
    for i in range(3):
        fs.pipe(f"{bucket}/in/{i}.pdf", b"%PDF-1 " + bytes([i]))
    return f"s3://{bucket}/in", dict(so)


def test_stamp_changes_when_a_local_file_is_rewritten(tmp_path: Path) -> None:
    from pipeline.sources import expand_input_stats

    f = tmp_path / "a.pdf"
    f.write_bytes(b"%PDF-1 one")
    [(uri, first)] = expand_input_stats(str(tmp_path))
    time.sleep(0.01)
    f.write_bytes(b"%PDF-1 two")  # same size, new bytes
    [(_, second)] = expand_input_stats(str(tmp_path))
    assert uri.startswith("file://") and first is not None and second is not None
    assert first[0] == second[0] and first[1] != second[1]


# ----------------------------------------------------------------------------- GETs on moto


def _job(src: str, out: str, so: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    opts = [f"+{side}.storage_options.{k}='{v}'" for side in ("input", "output") for k, v in so.items()]
    return run_job(
        "mode=tiny",
        "generation.max_new_tokens=4",
        f"input.uri={src}",
        f"output.uri={out}",
        *opts,
        *extra,
        timeout=600,
        env={"RAY_ADDRESS": "local"},
    )


class Recording:
    """moto's server-side request recorder (its /moto-api/recorder endpoints) over one job."""

    def __init__(self, endpoint: str, path: Path, monkeypatch: pytest.MonkeyPatch):
        from moto.moto_api import recorder

        # the recorder's log file is fixed when moto is imported (MOTO_RECORDER_FILEPATH, default
        # ./moto_recording); point it at the test's own directory
        monkeypatch.setattr(recorder, "_location", str(path))
        self.endpoint = endpoint

    def _post(self, what: str) -> None:
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{what}", method="POST", data=b"")
        urllib.request.urlopen(req).read()

    def __enter__(self) -> Recording:
        self._post("reset-recording")
        self._post("start-recording")
        return self

    def __exit__(self, *exc: object) -> None:
        self._post("stop-recording")

    def object_requests(self, bucket: str, prefix: str) -> Counter[tuple[str, str]]:
        """(method, key) of every request for one object under `prefix` (listings excluded)."""
        import urllib.request

        text = urllib.request.urlopen(f"{self.endpoint}/moto-api/recorder/download-recording").read().decode()
        out: Counter[tuple[str, str]] = Counter()
        for line in text.splitlines():
            e = json.loads(line)
            url = urlparse(e["url"])
            key = url.path.lstrip("/")
            if key.startswith(f"{bucket}/{prefix}") and not url.query.startswith("list"):
                out[(e["method"], key[len(bucket) + 1 :])] += 1
        return out


def _gets(reqs: Counter[tuple[str, str]]) -> dict[str, int]:
    return {k: n for (m, k), n in reqs.items() if m == "GET"}


def _summary(fs: Any, bucket: str) -> dict[str, Any]:
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{bucket}/out/_summary.json"))


@pytest.mark.slow
def test_rerun_over_unchanged_inputs_sends_no_get(
    s3_bucket, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, fs, so = s3_bucket
    for n in DOCS:
        fs.pipe(f"{bucket}/in/{n}", (corpus_dir / n).read_bytes())
    src, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
    rec = Recording(so["endpoint_url"], tmp_path / "moto-recording.jsonl", monkeypatch)

    with rec:  # 1. the first run reads every input
        first = _job(src, out, so)
    assert first.returncode == 0, first.stderr[-3000:]
    assert set(_gets(rec.object_requests(bucket, "in/"))) == {f"in/{n}" for n in DOCS}
    assert fs.ls(f"{bucket}/out/_cache/stat")
    doc_ids = {r["source_uri"]: r for r in pa.Table.to_pylist(_pages(fs, bucket))}

    with rec:  # 2. a no-op rerun: not one GET of an input object
        again = _job(src, out, so)
    assert again.returncode == 0, again.stderr[-3000:]
    reqs = rec.object_requests(bucket, "in/")
    assert _gets(reqs) == {}, reqs
    s = _summary(fs, bucket)
    assert s["rows_written"] == 0 and s["accounting_ok"] and s["documents_in"] == len(DOCS)

    # 3. a changed input is read and hashed again, the others are not
    changed = "form-libreoffice-01.pdf"
    fs.pipe(f"{bucket}/in/{changed}", (corpus_dir / changed).read_bytes() + b"\n% changed\n")
    with rec:
        third = _job(src, out, so)
    assert third.returncode == 0, third.stderr[-3000:]
    gets = _gets(rec.object_requests(bucket, "in/"))
    assert set(gets) == {f"in/{changed}"}, gets
    rows = _pages(fs, bucket).to_pylist()
    new_ids = {r["doc_id"] for r in rows if r["source_uri"].endswith(changed)}
    old_id = next(r["doc_id"] for r in doc_ids.values() if r["source_uri"].endswith(changed))
    assert new_ids - {old_id}, "the changed input kept its old doc_id"
    assert _summary(fs, bucket)["accounting_ok"]

    with rec:  # 4. input.rehash=true reads and hashes every input again (nothing to OCR)
        fourth = _job(src, out, so, "input.rehash=true")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert set(_gets(rec.object_requests(bucket, "in/"))) == {f"in/{n}" for n in DOCS}
    assert _summary(fs, bucket)["rows_written"] == 0


def _pages(fs: Any, bucket: str) -> pa.Table:
    import pyarrow.dataset as ds

    fs.invalidate_cache()
    return ds.dataset(f"{bucket}/out/pages", filesystem=fs, format="parquet").to_table(
        columns=["doc_id", "source_uri", "page_index"]
    )
