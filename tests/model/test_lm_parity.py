"""Language-model parity against the reference goldens (shared/parity/README.md, steps 2 and 5).

The reduced reference model (full vision, 2 LM layers, full vocabulary; 690 official keys) is built
on the meta device and filled through `model.checkpoint.load_weights` from the parity
generator's own `synth_tensor` under the OFFICIAL key names, so this also proves the rename table
on a real-sized model. Comparisons run in float32 on one CPU thread, at the README's tolerances.
"""

from __future__ import annotations

import gc
import importlib.util
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_weights, official_key_map
from model.config import OcrConfig
from model.generate import greedy_generate
from model.ocr import OcrModel

pytestmark = pytest.mark.parity


def _load_synth(parity_dir: Path):
    spec = importlib.util.spec_from_file_location("parity_synth_weights", parity_dir / "synth_weights.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _ReferenceSynth(Mapping[str, torch.Tensor]):
    """Lazy {official key: tensor} from the parity generator itself (not our model.synth copy)."""

    def __init__(self, synth, shapes: dict[str, tuple[int, ...]]) -> None:
        self.synth, self.shapes = synth, shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.synth.synth_tensor(key, self.shapes[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@pytest.fixture(scope="module")
def reduced(parity_dir: Path):
    synth = _load_synth(parity_dir)
    official = synth.load_keys_tsv(str(parity_dir / "keys.tsv"))  # {key: shape}
    drop = tuple(f"model.layers.{i}." for i in range(2, 12))
    shapes = {k: tuple(v) for k, v in official.items() if not k.startswith(drop)}
    assert len(shapes) == 690
    with torch.device("meta"):
        model = OcrModel(OcrConfig.official().with_layers(2))
    loaded = load_weights(model, _ReferenceSynth(synth, shapes), device="cpu", dtype=torch.float32)
    assert loaded == set(shapes)  # exactly the 690 keys, nothing missing or extra
    model.eval()
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def golden(parity_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(parity_dir / "golden.safetensors"))


@pytest.fixture(scope="module")
def cases(parity_dir: Path) -> dict:
    data = json.loads((parity_dir / "cases.json").read_text())
    return {"cases": {c["id"]: c for c in data["cases"]}, "lm": data["lm"]}


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, max_tol: float) -> None:
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    diff = (got.float() - ref.float()).abs().max().item()
    print(f"{name}: max {diff:.3e}")
    assert diff <= max_tol, f"{name}: max diff {diff:.3e} > {max_tol}"


def test_full_model_keys_equal_official(parity_dir: Path) -> None:
    """The 12-layer model's official key map is exactly keys.tsv (names and shapes)."""
    synth = _load_synth(parity_dir)
    official = {k: tuple(v) for k, v in synth.load_keys_tsv(str(parity_dir / "keys.tsv")).items()}
    with torch.device("meta"):
        model = OcrModel(OcrConfig.official())
    ours = {k: s.shape for k, s in official_key_map(model).items()}
    assert set(ours) ^ set(official) == set()
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == 3_336_106_240


@pytest.mark.parametrize("mode", ["gundam", "base"])
@torch.no_grad()
def test_lm_isolated_hidden_and_logits(reduced, golden, cases, mode: str) -> None:
    """Golden image vectors in, our 2-layer LM: residual stream and last-position logits."""
    ids = torch.tensor(cases["cases"][f"page/{mode}"]["input_ids"])[None]  # (1, L)
    L = ids.shape[1]
    captured: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: captured.append(o[0, -1]))
        for layer in reduced.decoder.layers
    ]
    try:
        emb = reduced.embed(ids, golden[f"page.{mode}.image_embeds"])
        logits = reduced.decoder(emb, torch.arange(L)[None], logits_index=torch.tensor([L - 1]))[0]
    finally:
        for h in hooks:
            h.remove()
    hidden = torch.stack([emb[0, -1], *captured])  # (3, D)
    _check(f"page.{mode}.last_hidden", hidden, golden[f"page.{mode}.last_hidden"], 5e-5)
    _check(f"page.{mode}.last_logits", logits, golden[f"page.{mode}.last_logits"], 5e-5)
    top20 = logits.topk(20).indices.tolist()
    assert top20 == cases["lm"][f"page/{mode}"]["top20_ids"]


@pytest.mark.parametrize("mode", ["gundam", "base"])
@torch.no_grad()
def test_greedy_ids_and_step_logits(reduced, golden, cases, mode: str) -> None:
    """12 greedy steps over our KV cache: ids AND the logits at the golden top-64 ids per step
    (the ids alone are weak evidence: the random LM loops, README 'Weak spot')."""
    ids = cases["cases"][f"page/{mode}"]["input_ids"]
    res = greedy_generate(
        reduced,
        ids,
        golden[f"page.{mode}.image_embeds"],
        max_new_tokens=12,
        eos_id=1,
        ngram_size=0,
        return_logits=True,
    )
    assert res.ids == cases["lm"][f"page/{mode}"]["greedy_new_ids"]
    top_ids = golden[f"page.{mode}.greedy_top64_ids"].long()  # (12, 64)
    got = torch.stack([s[t] for s, t in zip(res.step_logits, top_ids)])  # (12, 64)
    _check(f"page.{mode}.greedy_top64_logits", got, golden[f"page.{mode}.greedy_top64_logits"], 5e-5)


@torch.no_grad()
def test_end_to_end_base_own_vision(reduced, golden, cases, parity_dir: Path) -> None:
    """Our preprocessing + our vision + our LM from page.png: last-position logits."""
    from model.preprocess import load_image, preprocess_image

    prep = preprocess_image(load_image(parity_dir / "page.png"), "base")
    g, tiles = prep.pixel_tensors()
    emb = reduced.image_embeddings(g, tiles, prep.grid)
    ids = torch.tensor(cases["cases"]["page/base"]["input_ids"])[None]
    L = ids.shape[1]
    logits = reduced(ids, torch.arange(L)[None], emb, logits_index=torch.tensor([L - 1]))[0]
    _check("page.base.last_logits (own vision)", logits, golden["page.base.last_logits"], 5e-5)
