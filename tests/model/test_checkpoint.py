"""Checkpoint loading by official names: synthetic weights written as safetensors under the official
keys, read back strictly through `load_checkpoint` (the same path a real download takes), plus the
errors for missing, unexpected and mis-shaped keys, and our synth rule vs the parity fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointMismatch, load_checkpoint, official_key_map, official_state_dict
from model.config import ConfigError, OcrConfig
from model.hub import CheckpointUnavailable, resolve_config_json
from model.ocr import OcrModel
from model.synth import init_random_fast, random_model, synth_rule, synth_seed, synth_tensor


def _tiny_config_json(cfg: OcrConfig) -> dict:
    return cfg.to_hf_config()


def _write_checkpoint(root: Path, tensors: dict[str, torch.Tensor], cfg: dict, shards: int = 2) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    keys = sorted(tensors)
    for i in range(shards):
        part = {k: tensors[k].to(torch.bfloat16).contiguous() for k in keys[i::shards]}
        save_file(part, str(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))


@pytest.fixture(scope="module")
def tiny_official() -> dict[str, torch.Tensor]:
    """Synthetic weights of the tiny config under the official names, as a checkpoint would hold."""
    with torch.device("meta"):
        model = OcrModel(OcrConfig.tiny())
    return {k: synth_tensor(k, s.shape) for k, s in official_key_map(model).items()}


def test_load_checkpoint_from_directory_is_exact(tmp_path: Path, tiny_official) -> None:
    cfg = OcrConfig.tiny()
    root = tmp_path / "ckpt"
    _write_checkpoint(root, tiny_official, _tiny_config_json(cfg))
    model = load_checkpoint(root, dtype=torch.bfloat16)
    # the tiny config.json is read back (LM keys at the top level, like the official file)
    assert model.config.decoder == cfg.decoder
    got = official_state_dict(model)
    assert set(got) == set(tiny_official)
    for k, t in tiny_official.items():  # every tensor landed in the right slot (experts: stacked)
        assert torch.equal(got[k], t.to(torch.bfloat16)), k
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert resolve_config_json(root) == root / "config.json"


@pytest.mark.parametrize("fault", ["missing", "unexpected", "misshaped"])
def test_strict_errors_name_the_key(tmp_path: Path, tiny_official, fault: str) -> None:
    tensors = dict(tiny_official)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    if fault == "missing":
        del tensors[key]
    elif fault == "unexpected":
        tensors["model.layers.1.mlp.experts.99.up_proj.weight"] = tensors[key]
    else:
        tensors[key] = tensors[key][:-1]
    root = tmp_path / fault
    _write_checkpoint(root, tensors, _tiny_config_json(OcrConfig.tiny()))
    with pytest.raises(CheckpointMismatch) as e:
        load_checkpoint(root)
    msg = str(e.value)
    assert ("experts.99" if fault == "unexpected" else key) in msg
    assert {"missing": "1 missing", "unexpected": "1 unexpected", "misshaped": "1 mis-shaped"}[fault] in msg


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointUnavailable, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointUnavailable, match="config.json"):
        load_checkpoint(tmp_path / "empty")


def test_official_config_json_values() -> None:
    """The official config.json's top-level LM keys (spec §1.6) give the official decoder."""
    official = {
        "hidden_size": 1280,
        "intermediate_size": 6848,
        "moe_intermediate_size": 896,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_attention_heads": 10,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 12,
        "num_key_value_heads": 10,
        "first_k_dense_replace": 1,
        "kv_lora_rank": None,
        "q_lora_rank": None,
        "topk_method": "greedy",
        "use_mla": False,
        "vocab_size": 129280,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "max_position_embeddings": 8192,
        "projector_config": {"input_dim": 2048, "n_embed": 1280, "projector_type": "linear"},
    }
    assert OcrConfig.from_hf_config(official) == OcrConfig.official()
    assert OcrConfig.from_hf_config(OcrConfig.official().to_hf_config()) == OcrConfig.official()
    assert "pagemill_vision" not in OcrConfig.official().to_hf_config()
    with pytest.raises(ConfigError, match="use_mla"):
        OcrConfig.from_hf_config({**official, "use_mla": True})


def test_synth_rule_matches_parity_fingerprints(parity_dir: Path) -> None:
    """model.synth reproduces the parity generator bit for bit (SHA-256 of the float32 bytes)."""
    fps = json.loads((parity_dir / "cases.json").read_text())["synth_fingerprints"]
    assert len(fps) >= 10
    for name, fp in fps.items():
        t = synth_tensor(name, fp["shape"])
        assert synth_seed(name) == fp["seed"] and synth_rule(name, fp["shape"]) == fp["rule"], name
        assert hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest() == fp["sha256_f32_le"], name


def test_init_random_fast_fills_every_parameter_by_the_rule() -> None:
    """The device-generator init of `full_random` (here: tiny config, CPU): every element of every
    parameter is overwritten, each official tensor follows its synth rule, a seed is reproducible."""
    model = random_model("cpu", seed=3, config=OcrConfig.tiny(), dtype=torch.float32)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # a sentinel no draw can give (randn gives an exact 0 now and then)
    keys = init_random_fast(model, seed=3)
    kmap = official_key_map(model)
    assert keys == set(kmap)
    for name, p in model.named_parameters():
        assert bool(p.isfinite().all()), f"{name}: elements left unfilled"
    got = official_state_dict(model)
    rules = set()
    for key, t in got.items():
        rule = synth_rule(key, t.shape)
        rules.add(rule)
        t = t.double()
        if rule == "norm_weight":  # 1 + 0.05 N
            assert abs(t.mean() - 1) < 0.05 and t.min() > 0.5 and t.max() < 1.5, key
        elif rule in ("norm_bias", "table", "vector"):  # 0.02 N
            assert t.abs().max() < 0.2 and (t.numel() < 64 or 0.01 < t.std() < 0.03), key
        else:  # N / sqrt(fan_in)
            expected = 1 / (t[0].numel() ** 0.5)
            assert t.numel() < 256 or 0.7 * expected < t.std() < 1.3 * expected, key
    assert rules == {"norm_weight", "norm_bias", "table", "vector", "fan_in"}
    again = random_model("cpu", seed=3, config=OcrConfig.tiny(), dtype=torch.float32)
    other = random_model("cpu", seed=4, config=OcrConfig.tiny(), dtype=torch.float32)
    pairs = list(zip(model.parameters(), again.parameters(), other.parameters()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)
