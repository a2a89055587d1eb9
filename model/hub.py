"""Where a checkpoint comes from: a local directory as is, or a Hugging Face hub id downloaded.

The only module that talks to the hub. `resolve_source` gives the directory to load from
(`model.checkpoint.load_checkpoint` reads it); `resolve_config_json` fetches only config.json,
a cheap probe that the weights are reachable before a job starts. Every failure is a
`CheckpointUnavailable` whose message names the offline option.
"""

from __future__ import annotations

from pathlib import Path

OFFICIAL_HUB_ID = "deepseek-ai/DeepSeek-OCR"  # the official checkpoint (the default source)
CHECKPOINT_FILES = ("config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json")
OFFLINE_HINT = "run offline with the random-weight model: model=tiny_random"


class CheckpointUnavailable(RuntimeError):
    """The weights could not be found locally nor fetched from the hub."""


def local_dir(path_or_hub_id: str | Path) -> Path | None:
    """The local directory named by `path_or_hub_id`, None for a hub id; a missing path raises
    (a path-looking source that does not exist must not be sent to the hub as an id)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_hub_id).startswith(("/", ".", "~")) or path.exists():
        raise CheckpointUnavailable(
            f"checkpoint directory {str(path)!r} does not exist. Point it at a copy of "
            f"{OFFICIAL_HUB_ID}, or {OFFLINE_HINT}"
        )
    return None


def hub_download(hub_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """Snapshot directory of `hub_id` at `revision` (default: the main branch) holding the files
    that match `patterns`; any hub, network or offline failure raises CheckpointUnavailable."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # any hub/network/offline failure gets the same advice
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointUnavailable(
            f"could not fetch {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {first}). "
            f"Use a local checkpoint directory, or {OFFLINE_HINT}"
        ) from e


def resolve_source(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """Checkpoint directory of `path_or_hub_id`: a local directory as is, a hub id downloaded
    (at `revision`, a branch, tag or commit; ignored for a local directory)."""
    local = local_dir(path_or_hub_id)
    if local is not None:
        return local
    return hub_download(str(path_or_hub_id), list(CHECKPOINT_FILES), revision)


def resolve_config_json(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """Path of the checkpoint's config.json; fetches only that file from the hub."""
    local = local_dir(path_or_hub_id)
    root = local if local is not None else hub_download(str(path_or_hub_id), ["config.json"], revision)
    if not (root / "config.json").is_file():
        raise CheckpointUnavailable(f"{root} has no config.json")
    return root / "config.json"
