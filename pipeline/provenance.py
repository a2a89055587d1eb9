"""Provenance: which model revision and which version of the output-affecting code made a row.

`config_hash` (PipelineConfig.output_affecting: the HASH fields) covers `model.revision` and OUTPUT_CODE_VERSION, so
a hub update or a parser change writes rows under a new hash instead of being counted as done by
the ledger. The driver resolves the revision once at start (`resolve_revision`), before any hash
is computed, and the resolved value travels to the workers inside the config.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from model.config import ModelName
from pipeline.config import PipelineConfig


def resolve_revision(cfg: PipelineConfig) -> str:
    """The model's revision: the hub snapshot's commit sha; for a local directory a digest of its
    config.json and weight file names and sizes ("local-…"); for the random-weight models ""
    (their weights are a function of the seed and OUTPUT_CODE_VERSION, both already hashed, so a
    composed config hashes like a resolved one)."""
    if cfg.model.name != ModelName.deepseek_ocr:
        return ""
    from model.hub import resolve_config_json

    config_json = resolve_config_json(cfg.model.source)
    root = config_json.parent
    if root.parent.name == "snapshots":  # huggingface_hub cache layout: snapshots/<commit sha>/
        return root.name
    h = hashlib.sha256(config_json.read_bytes())
    for p in sorted(Path(root).glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return "local-" + h.hexdigest()[:16]


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """Pin `cfg.model.revision` to the resolved one (in place; call on the driver before hashing)."""
    cfg.model.revision = resolve_revision(cfg)
    return cfg
