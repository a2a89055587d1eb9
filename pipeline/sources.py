"""Input discovery and document reads over fsspec (no Ray).

`expand_input` turns whatever the user passed as `input` (a directory, a glob, a list file, a single
file, or a list of those; local paths or any fsspec URI such as `file://`, `memory://`, `s3://`)
into a sorted, de-duplicated list of fully-qualified URIs. Every later stage keys on those URIs, so
they are always protocol-prefixed (`file:///abs/x.pdf`), never relative or bare.

`read_document` / `stat_size` / `content_id` are the per-document primitives the distributed read
tasks use. They hold at most one document in memory and can refuse oversized files *before*
reading them (`max_bytes`), so one 2 GB upload cannot take a worker down.

Deliberately not done here: list-file entries are not stat'ed while listing (a 1M-line list would
cost 1M round trips on S3; discovery stats them in parallel workers, `stat_many`, for the stat
cache); a missing entry surfaces later as a per-document read error, which keeps it in the
ledger instead of aborting discovery. `expand_input_stats` keeps what a listing already says
about each file (size, ETag or mtime: `stat_stamp`), free, for the stat cache; `listing_table` is
the same as one Arrow table (LISTING_SCHEMA), which is what discovery's listing task hands the
driver (no Python object per document there).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import Any, cast

import fsspec
import pyarrow as pa
from fsspec.spec import AbstractFileSystem

__all__ = [
    "InputError",
    "DocumentTooLarge",
    "expand_input",
    "expand_input_stats",
    "listing_table",
    "stat_table",
    "LISTING_SCHEMA",
    "stat_stamp",
    "read_document",
    "read_passwords",
    "stat_size",
    "stat_many",
    "content_id",
    "DEFAULT_SUFFIXES",
    "LIST_SUFFIXES",
]

DEFAULT_SUFFIXES: tuple[str, ...] = (".pdf",)
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".lst")
_GLOB_MAGIC = re.compile(r"[*?\[]")
# one row per listed document: size and stamp (`stat_stamp`) as the listing gave them, both null
# where it gave none (list-file entries, a failed HEAD)
LISTING_SCHEMA = pa.schema(
    [pa.field("source_uri", pa.string()), pa.field("size", pa.int64()), pa.field("stamp", pa.string())]
)


class InputError(ValueError):
    """The input specification cannot be resolved (missing path, nothing matched, bad list file)."""


class DocumentTooLarge(InputError):
    """A document is larger than the caller's `max_bytes` limit (raised before reading it all)."""

    def __init__(self, uri: str, size: int, max_bytes: int) -> None:
        super().__init__(f"{uri}: {size} bytes exceeds max_bytes={max_bytes}")
        self.uri, self.size, self.max_bytes = uri, size, max_bytes


def _fs(uri: str, storage_options: dict[str, Any] | None) -> tuple[AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as e:  # unknown protocol / missing backend (e.g. s3fs)
        raise InputError(f"cannot open filesystem for {uri!r}: {e}") from e


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _has_suffix(path: str, suffixes: Sequence[str] | None) -> bool:
    if suffixes is None:  # None = accept every file
        return True
    low = path.lower()
    return any(low.endswith(s.lower()) for s in suffixes)


def _read_list(fs: AbstractFileSystem, path: str, storage_options: dict[str, Any] | None) -> list[str]:
    """Parse a list file: one URI/path per line, `#` comments and blank lines ignored.

    Relative entries resolve against the list file's directory on the list file's filesystem;
    entries with a protocol (`s3://…`) are taken as they are (normalised).
    """
    with fs.open(path, "rb") as f:
        raw = cast(bytes, f.read())  # binary mode: fsspec's read() is typed str | bytes
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"list file {fs.unstrip_protocol(path)} is not UTF-8 text: {e}") from e
    base = fs._parent(path)
    out: list[str] = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" in entry or "::" in entry:
            efs, epath = _fs(entry, storage_options)
            out.append(efs.unstrip_protocol(epath))
            continue
        if _is_local(fs):
            entry = os.path.expanduser(entry)
            joined = entry if os.path.isabs(entry) else os.path.join(base, entry)
            joined = os.path.normpath(joined)
        else:
            joined = posixpath.normpath(posixpath.join(base, entry))
        out.append(fs.unstrip_protocol(cast(str, fs._strip_protocol(joined))))  # str in -> str out
    return out


def stat_stamp(info: dict[str, Any]) -> str | None:
    """What identifies one version of a file in an fsspec `info` record, without reading it: the
    object store's ETag (or GCS generation), else the local mtime and inode. None: nothing usable
    (such a file is never taken from the stat cache)."""
    for k in ("ETag", "etag", "e_tag"):
        if info.get(k):
            return f"etag:{str(info[k]).strip(chr(34))}"
    if info.get("generation"):
        return f"gen:{info['generation']}"
    if info.get("mtime") is not None:
        return f"mtime:{float(info['mtime'])!r}:ino:{info.get('ino', '')}"
    return None


Stat = tuple[int, str] | None  # (size, stamp) from the listing, None where it gave none


def _stat(info: dict[str, Any]) -> Stat:
    stamp, size = stat_stamp(info), info.get("size")
    return (int(size), stamp) if stamp is not None and isinstance(size, int) else None


def _expand_one(
    uri: str,
    storage_options: dict[str, Any] | None,
    suffixes: Sequence[str] | None,
    list_suffixes: Sequence[str],
) -> dict[str, Stat]:
    fs, path = _fs(uri, storage_options)
    if fs.exists(path):
        if fs.isdir(path):
            found = cast(dict[str, dict[str, Any]], fs.find(path, withdirs=False, detail=True))
            return {fs.unstrip_protocol(p): _stat(i) for p, i in found.items() if _has_suffix(p, suffixes)}
        if list_suffixes and _has_suffix(path, list_suffixes):
            return dict.fromkeys(_read_list(fs, path, storage_options))
        return {fs.unstrip_protocol(path): _stat(fs.info(path))}  # named: taken whatever its suffix
    if _GLOB_MAGIC.search(path):
        # The pattern is the user's filter: no suffix filtering, but directories are dropped.
        hits = cast(dict[str, dict[str, Any]], fs.glob(path, detail=True))  # detail=True -> {path: info}
        files = {p: _stat(i) for p, i in hits.items() if i.get("type") != "directory"}
        if not files:
            raise InputError(f"glob {uri!r} matched no files")
        return {fs.unstrip_protocol(p): st for p, st in files.items()}
    raise InputError(f"input {uri!r} does not exist")


def expand_input(
    uri: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    suffixes: Sequence[str] | None = DEFAULT_SUFFIXES,
    list_suffixes: Sequence[str] = LIST_SUFFIXES,
) -> list[str]:
    """Resolve an input spec to sorted, de-duplicated, protocol-qualified document URIs.

    uri: a directory (searched recursively, files filtered by `suffixes`, case-insensitive;
         `suffixes=None` takes every file), a glob (`/data/**/*.pdf`, `s3://b/x/*.pdf`; the pattern
         is the filter), a list file (suffix in `list_suffixes`), any other single file, or a
         sequence of these (results are merged).
    Raises InputError if a path does not exist or an input yields no documents.
    """
    return [
        u for u, _ in expand_input_stats(uri, storage_options, suffixes=suffixes, list_suffixes=list_suffixes)
    ]


def expand_input_stats(
    uri: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    suffixes: Sequence[str] | None = DEFAULT_SUFFIXES,
    list_suffixes: Sequence[str] = LIST_SUFFIXES,
) -> list[tuple[str, Stat]]:
    """`expand_input` with each URI's (size, stamp) as the listing gave it (no extra request);
    None for list-file entries, which are not stat'ed here."""
    specs = [uri] if isinstance(uri, str) else list(uri)
    if not specs:
        raise InputError("no input given")
    found: dict[str, Stat] = {}
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            raise InputError("empty input path")
        hits = _expand_one(spec, storage_options, suffixes, list_suffixes)
        if not hits:
            what = f"with suffix {tuple(suffixes)}" if suffixes is not None else ""
            raise InputError(f"input {spec!r} contains no files {what}".rstrip())
        for u, st in hits.items():
            found[u] = found.get(u) or st
    return sorted(found.items())


def _stats_table(uris: list[str], stats: Iterable[Stat]) -> pa.Table:
    sizes: list[int | None] = []
    stamps: list[str | None] = []
    for st in stats:
        sizes.append(st[0] if st is not None else None)
        stamps.append(st[1] if st is not None else None)
    return pa.table(
        [pa.array(uris, pa.string()), pa.array(sizes, pa.int64()), pa.array(stamps, pa.string())],
        schema=LISTING_SCHEMA,
    )


def listing_table(
    uri: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    suffixes: Sequence[str] | None = DEFAULT_SUFFIXES,
    list_suffixes: Sequence[str] = LIST_SUFFIXES,
) -> pa.Table:
    """`expand_input_stats` as one LISTING_SCHEMA table, sorted by source_uri (size and stamp
    null where the listing gave none). Discovery runs it as a Ray task: the driver gets Arrow
    buffers back, not a tuple per document."""
    listed = expand_input_stats(uri, storage_options, suffixes=suffixes, list_suffixes=list_suffixes)
    table = _stats_table([u for u, _ in listed], (st for _, st in listed))
    del listed
    return table


def stat_table(uris: Sequence[str], storage_options: dict[str, Any] | None = None) -> pa.Table:
    """`stat_many` as a LISTING_SCHEMA table (the uris in order; size and stamp null where the
    request failed)."""
    uris = list(uris)
    return _stats_table(uris, stat_many(uris, storage_options))


def stat_many(uris: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[Stat]:
    """(size, stamp) of each URI, one metadata request each (HEAD on object stores), in threads;
    None where it fails (the read then reports the error)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(u: str) -> Stat:
        try:
            fs, path = _fs(u, storage_options)
            return _stat(fs.info(path))
        except Exception:
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, uris))


def stat_size(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Size in bytes of one document (one metadata call; no data read)."""
    fs, path = _fs(uri, storage_options)
    return int(cast(int, fs.size(path)))  # fsspec types size() Optional; int() still rejects None


def read_document(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    max_bytes: int | None = None,
) -> bytes:
    """Read one whole document into memory.

    With `max_bytes`, a larger document raises DocumentTooLarge without being read in full (the
    size is taken from the open file where the backend knows it, and the read is capped anyway).
    Missing files raise FileNotFoundError; other backend failures raise OSError subclasses.
    """
    fs, path = _fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        if max_bytes is None:
            return cast(bytes, f.read())  # binary mode
        size = getattr(f, "size", None)
        if isinstance(size, int) and size > max_bytes:
            raise DocumentTooLarge(uri, size, max_bytes)
        data = cast(bytes, f.read(max_bytes + 1))  # binary mode
    if len(data) > max_bytes:
        raise DocumentTooLarge(uri, size if isinstance(size, int) else len(data), max_bytes)
    return data


def content_id(data: bytes | bytearray | memoryview | Iterable[bytes]) -> str:
    """sha256 hex digest of a document's bytes (the pipeline's content address).

    Accepts a bytes-like object or an iterable of chunks (for hashing a stream without holding it).
    """
    h = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        h.update(data)
    else:
        for chunk in data:
            h.update(chunk)
    return h.hexdigest()


def read_passwords(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """{sha256 or file name: password} from a `key<TAB>password` file ("" -> {}).

    Blank lines and `#` comments are skipped; a line without a tab is an InputError naming it."""
    if not uri:
        return {}
    fs, path = _fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            text = cast(bytes, f.read()).decode("utf-8-sig")  # binary mode
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read passwords file {uri!r}: {e}") from e
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, tab, pw = line.partition("\t")
        if not tab or not key.strip():
            raise InputError(f"passwords file {uri!r} line {lineno}: expected 'key<TAB>password'")
        out[key.strip()] = pw
    return out
