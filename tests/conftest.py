"""Shared test fixtures: where the read-only fixtures (`../shared`) live, and torch thread pinning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PAGEMILL_SHARED", REPO.parent / "shared")).resolve()
PARITY = SHARED / "parity"
CORPUS = SHARED / "corpus" / "dev"


def _require(path: Path) -> Path:
    if not path.exists():
        # Not a skip: CI always has ../shared, and silently skipping parity would hide regressions.
        raise FileNotFoundError(f"test fixtures not found at {path} (set PAGEMILL_SHARED)")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return _require(PARITY)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return _require(CORPUS)


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch() -> None:
    # This machine's torch gives wrong sqrt results on a second CPU thread (shared/parity/README.md).
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def corpus_copy(corpus_dir: Path, tmp_path: Path):
    """`corpus_copy(*names)`: a fresh input folder (tmp_path/in) holding copies of these dev-corpus
    PDFs, for runs that must own their input (incremental reruns add, change and delete files)."""
    import shutil

    def make(*names: str) -> Path:
        src = tmp_path / "in"
        src.mkdir(exist_ok=True)
        for name in names:
            shutil.copy(corpus_dir / name, src / name)
        return src

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server mode on 127.0.0.1 (a thread of this process, reachable by
    the job subprocess and its Ray workers). Yields the s3fs `storage_options` to reach it."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on `s3_server` for this test: (bucket name, s3fs filesystem, storage_options).
    The filesystem has no listing cache (other processes write to the bucket)."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True, use_listings_cache=False)
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name, fs, s3_server
