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


def test_cache_round_trip_skips_what_it_must_not_keep(tmp_path: Path) -> None:
    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache

    store = OutputStore(str(tmp_path / "out"))
    cache = StatCache.load(store)  # missing: empty, no error
    assert cache.entries == {}
    rows = [
        _row("file:///a.pdf", "etag:1"),
        {**_row("file:///b.pdf", "etag:2"), "error_code": "read_error"},  # may be transient
        {**_row("file:///c.pdf", "etag:3"), "password": "pw"},  # a password applies
        {**_row("file:///d.pdf", "etag:4"), "error_code": "not_a_pdf"},  # bytes decide it
    ]
    assert cache.add(rows, live=set()) == 2
    assert cache.add(rows, live=set()) == 0  # nothing new: no second part
    again = StatCache.load(store)
    assert set(again.entries) == {("file:///a.pdf", 10, "etag:1"), ("file:///d.pdf", 10, "etag:4")}
    hit = again.get("file:///a.pdf", 10, "etag:1")
    assert hit is not None and hit["doc_id"] == "d1"
    assert again.get("file:///a.pdf", 10, "etag:other") is None  # a new version is a miss
    assert len(list((tmp_path / "out" / CACHE_DIR).glob("part-*.parquet"))) == 1


def test_corrupt_part_is_skipped_and_only_costs_a_rehash(tmp_path: Path) -> None:
    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache

    store = OutputStore(str(tmp_path / "out"))
    StatCache.load(store).add([_row("file:///a.pdf", "etag:1")], live=set())
    StatCache.load(store).add([_row("file:///b.pdf", "etag:2")], live=set())
    parts = sorted((tmp_path / "out" / CACHE_DIR).glob("part-*.parquet"))
    assert len(parts) == 2
    parts[0].write_bytes(b"not parquet at all")
    loaded = StatCache.load(store)
    assert len(loaded.entries) == 1  # the other part still serves


def test_consolidation_keeps_the_live_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.statcache as sc
    from pipeline.outputs import OutputStore

    monkeypatch.setattr(sc, "MAX_PARTS", 3)
    store = OutputStore(str(tmp_path / "out"))
    for i in range(3):
        sc.StatCache.load(store).add([_row(f"file:///{i}.pdf", "etag:x")], live=set())
    live = {("file:///0.pdf", 10, "etag:x"), ("file:///3.pdf", 10, "etag:x")}
    sc.StatCache.load(store).add([_row("file:///3.pdf", "etag:x")], live=live)
    assert len(list((tmp_path / "out" / sc.CACHE_DIR).glob("part-*.parquet"))) == 1
    assert set(sc.StatCache.load(store).entries) == live


def test_rehash_that_contradicts_an_entry_replaces_it(tmp_path: Path) -> None:
    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache

    store = OutputStore(str(tmp_path / "out"))
    StatCache.load(store).add([_row("file:///a.pdf", "etag:1"), _row("file:///b.pdf", "etag:2")], live=set())
    key = ("file:///a.pdf", 10, "etag:1")
    StatCache.load(store).add([_row("file:///a.pdf", "etag:1", doc_id="d2")], live={key})
    assert len(list((tmp_path / "out" / CACHE_DIR).glob("part-*.parquet"))) == 1
    hit = StatCache.load(store).get(*key)
    assert hit is not None and hit["doc_id"] == "d2"


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
