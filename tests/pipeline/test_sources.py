"""Input discovery and document reads (pipeline.sources) on real local and in-memory filesystems."""

from __future__ import annotations

import csv
import hashlib
import uuid
from pathlib import Path

import fsspec
import pytest

from pipeline.sources import (
    DocumentTooLarge,
    InputError,
    content_id,
    expand_input,
    read_document,
    stat_size,
)


def _uri(p: Path) -> str:
    return "file://" + p.resolve().as_posix()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{top.pdf, UPPER.PDF, notes.txt, a/{x.pdf, w.Pdf, b/{y.pdf, z.docx}}, empty/}"""
    for rel in ("top.pdf", "UPPER.PDF", "notes.txt", "a/x.pdf", "a/w.Pdf", "a/b/y.pdf", "a/b/z.docx"):
        p = tmp_path / "root" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"%PDF-1.4 " + rel.encode())
    (tmp_path / "root" / "empty").mkdir()
    return tmp_path / "root"


def test_directory_is_recursive_and_suffix_filter_is_case_insensitive(tree: Path) -> None:
    want = sorted(_uri(tree / r) for r in ("top.pdf", "UPPER.PDF", "a/x.pdf", "a/w.Pdf", "a/b/y.pdf"))
    assert expand_input(str(tree)) == want
    assert expand_input(str(tree) + "/") == want
    assert expand_input(_uri(tree)) == want  # file:// URI of the same directory
    assert expand_input(str(tree), suffixes=[".DOCX", ".txt"]) == [
        _uri(tree / "a/b/z.docx"),
        _uri(tree / "notes.txt"),
    ]
    everything = expand_input(str(tree), suffixes=None)
    assert len(everything) == 7 and all(u.startswith("file:///") for u in everything)
    # an explicitly named file is taken whatever its suffix; a list of specs is merged and de-duplicated
    assert expand_input(str(tree / "a/b/z.docx")) == [_uri(tree / "a/b/z.docx")]
    merged = expand_input([str(tree / "a"), str(tree / "a/x.pdf"), _uri(tree / "top.pdf")])
    assert merged == sorted(_uri(tree / r) for r in ("a/x.pdf", "a/w.Pdf", "a/b/y.pdf", "top.pdf"))


def test_relative_paths_become_absolute_uris(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    assert expand_input("a/b") == [_uri(tree / "a/b/y.pdf")]
    assert expand_input("a/*.pdf") == [_uri(tree / "a/x.pdf")]


def test_glob_is_the_filter(tree: Path) -> None:
    assert expand_input(str(tree / "a" / "*")) == [_uri(tree / "a/w.Pdf"), _uri(tree / "a/x.pdf")]  # no dirs
    assert expand_input(str(tree / "**" / "*.pdf")) == sorted(
        _uri(tree / r) for r in ("top.pdf", "a/x.pdf", "a/b/y.pdf")
    )
    assert expand_input(str(tree / "a" / "b" / "*.docx")) == [_uri(tree / "a/b/z.docx")]
    with pytest.raises(InputError, match="matched no files"):
        expand_input(str(tree / "*.xyz"))


def test_list_file_relative_absolute_comments(tree: Path) -> None:
    lists = tree.parent / "lists"
    lists.mkdir()
    listing = lists / "docs.txt"
    listing.write_text(
        "\ufeff# documents to process\n"  # BOM + comment
        "\n"
        "../root/a/x.pdf\n"  # relative to the list file's directory, not the cwd
        f"   {tree / 'top.pdf'}   \n"  # absolute, surrounding whitespace
        "  # indented comment\n"
        f"{_uri(tree / 'a/b/y.pdf')}\r\n"  # URI, CRLF line end
        "../root/a/x.pdf\n"  # duplicate
        "not/there.pdf\n"  # not stat'ed here: a missing entry surfaces later as a read error
        "memory://bucket/elsewhere.pdf\n",
        encoding="utf-8",
    )
    got = expand_input(str(listing))
    assert got == sorted(
        [
            _uri(tree / "a/x.pdf"),
            _uri(tree / "top.pdf"),
            _uri(tree / "a/b/y.pdf"),
            _uri(lists / "not/there.pdf"),
            "memory:///bucket/elsewhere.pdf",
        ]
    )
    assert expand_input(_uri(listing)) == got
    # a list file inside an input directory is just a non-PDF there, not expanded
    with pytest.raises(InputError, match="contains no files"):
        expand_input(str(lists))
    bad = lists / "bad.lst"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        expand_input(str(bad))


def test_memory_filesystem_and_reads() -> None:
    root = f"memory://pagemill-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    base = root.removeprefix("memory://")
    blobs = {"d/one.pdf": b"%PDF-1.7 one", "d/sub/two.PDF": b"%PDF-1.7 two", "d/readme.md": b"# no"}
    for rel, data in blobs.items():
        fs.pipe(f"/{base}/{rel}", data)
    fs.pipe(f"/{base}/list.txt", b"d/one.pdf\n# c\nd/sub/two.PDF\n/abs/elsewhere.pdf\n")
    try:
        docs = expand_input(f"{root}/d")
        assert docs == [f"memory:///{base}/d/one.pdf", f"memory:///{base}/d/sub/two.PDF"]
        assert expand_input(f"{root}/d/*.pdf") == docs[:1]
        assert expand_input(f"{root}/list.txt") == sorted(docs + ["memory:///abs/elsewhere.pdf"])
        # every URI discovery hands out reads back through the same primitives
        for uri, rel in zip(docs, ("d/one.pdf", "d/sub/two.PDF")):
            assert read_document(uri) == blobs[rel]
            assert stat_size(uri) == len(blobs[rel])
            assert content_id(read_document(uri)) == hashlib.sha256(blobs[rel]).hexdigest()
        assert read_document(docs[0], max_bytes=len(blobs["d/one.pdf"])) == blobs["d/one.pdf"]
        with pytest.raises(DocumentTooLarge) as ei:
            read_document(docs[0], max_bytes=3)
        assert (ei.value.size, ei.value.max_bytes) == (len(blobs["d/one.pdf"]), 3)
        assert isinstance(ei.value, InputError)
        with pytest.raises(FileNotFoundError):
            read_document(f"{root}/d/missing.pdf")
        with pytest.raises(InputError, match="does not exist"):
            expand_input(f"{root}/nope")
    finally:
        fs.rm(f"/{base}", recursive=True)


def test_missing_and_bad_inputs(tree: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        expand_input(str(tree / "missing"))
    with pytest.raises(InputError, match="does not exist"):
        expand_input([str(tree / "a"), str(tree / "missing.pdf")])  # one bad spec fails the lot
    with pytest.raises(InputError, match="contains no files"):
        expand_input(str(tree / "empty"))
    with pytest.raises(InputError, match="no input"):
        expand_input([])
    with pytest.raises(InputError, match="empty input"):
        expand_input("  ")
    with pytest.raises(InputError, match="cannot open filesystem"):
        expand_input("nosuchproto://bucket/x.pdf")
    assert issubclass(InputError, ValueError)


def test_content_id_is_sha256(corpus_dir: Path, tree: Path) -> None:
    data = (tree / "a/x.pdf").read_bytes()
    want = hashlib.sha256(data).hexdigest()
    assert content_id(data) == content_id(bytearray(data)) == content_id(memoryview(data)) == want
    assert content_id([data[:3], b"", data[3:]]) == want  # chunked stream
    assert content_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with open(corpus_dir / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows[:: max(1, len(rows) // 12)]:  # a spread of the real corpus against its manifest
        assert content_id(read_document(_uri(corpus_dir / row["file"]))) == row["sha256"], row["file"]
