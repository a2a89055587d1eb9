"""The Triton kernels against their plain-torch references: the fused SAM attention
(`model.sam_attention`) and the split-KV paged decode (`model.paged_attention`).

The kernel is Triton; here it runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32),
which executes the same kernel program with NumPy. The variable is read when Triton decorates the
kernel, so each check runs in a fresh interpreter process. The bf16 check on the real GPU is in
`tests/model/test_gpu.py`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

REPO = Path(__file__).resolve().parents[2]

# each case: (grid height, grid width, window (0 = global), heads, head dim)
ATTENTION_CASES = [
    (10, 10, 4, 2, 16),
    (8, 8, 0, 2, 16),
    (7, 10, 3, 1, 32),
    (6, 9, 0, 2, 16),
    (14, 14, 14, 2, 16),
]

SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
from model import sam, sam_attention
from model.config import OcrConfig

def reference(attn, x, ws):
    sam.ATTENTION_IMPL = "bias"  # the reference's dense-bias math
    try:
        if not ws:
            return attn(x)
        y, Hp, Wp = sam.window_partition(x, ws)
        return sam.window_unpartition(attn(y), ws, Hp, Wp, x.shape[1], x.shape[2])
    finally:
        sam.ATTENTION_IMPL = "augmented"

out = {"interpret": sam_attention.INTERPRET, "cases": [], "rel_terms": []}
torch.manual_seed(0)
with torch.no_grad():
    for gh, gw, ws, heads, hd in json.loads(sys.argv[1]):
        attn = sam.Attention(heads * hd, heads, ws or gh)
        for p in attn.parameters():
            p.normal_(0, 0.5)
        x = torch.randn(2, gh, gw, heads * hd)
        ref = reference(attn, x, ws)
        got = attn.fused(x, ws)
        qkv = attn.qkv(x)
        rh = sam.rel_pos_table(ws or gh, attn.rel_pos_h)
        rw = sam.rel_pos_table(ws or gw, attn.rel_pos_w)
        terms = sam_attention.grid_rel_terms(qkv, rh, rw, heads)
        q = qkv.view(*qkv.shape[:3], 3, heads, hd)[:, :, :, 0]
        for t, r in zip(terms, sam_attention.grid_rel_terms_reference(q, rh, rw)):
            out["rel_terms"].append([(t - r).abs().max().item(), r.abs().max().item()])
        out["cases"].append([(got - ref).abs().max().item(), ref.abs().max().item()])
    # the whole tiny SAM encoder (2 blocks: one windowed with padding, one global) at 256 px
    enc = sam.ImageEncoderViT(OcrConfig.tiny().sam)
    for p in enc.parameters():
        p.normal_(0, 0.05)
    img = torch.randn(2, 3, 256, 256)
    assert sam.use_fused(img)
    got = enc(img)
    sam.FUSED_ON_CUDA = False
    ref = enc(img)
    out["encoder"] = [(got - ref).abs().max().item(), ref.abs().max().item()]
print(json.dumps(out))
"""


def _run(cases: list, script: str = SCRIPT) -> dict:
    import json

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fused_kernel_equals_the_reference_attention_and_encoder() -> None:
    out = _run(ATTENTION_CASES)
    assert out["interpret"] is True
    for err, scale in out["rel_terms"]:  # the bias-term kernel against the two einsums
        assert scale > 1.0 and err <= 1e-5 * scale, (err, scale)
    assert len(out["cases"]) == len(ATTENTION_CASES)
    for (err, scale), case in zip(out["cases"], ATTENTION_CASES):
        assert scale > 1.0, case  # a real signal, not all zeros
        assert err <= 1e-5 * scale + 1e-5, (case, err, scale)
    err, scale = out["encoder"]
    assert scale > 0.01
    assert err <= 1e-4 * scale + 1e-6, (err, scale)


PAGED_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
from model import paged_attention

torch.manual_seed(0)
bs, H, hd, per_row = 16, 2, 16, 80  # rows up to 1,280 tokens: 3 splits of 512
lens = torch.tensor(json.loads(sys.argv[1]))
B = len(lens)
k_pool = torch.randn(B * per_row + 1, bs, H, hd)
v_pool = torch.randn_like(k_pool)
table = (torch.randperm(B * per_row) + 1).view(B, per_row).to(torch.int32)  # scattered blocks
q = torch.randn(B, H, hd)
want = []
for r in range(B):  # plain attention over each row's own first lens[r] cached tokens
    ks = k_pool[table[r].long()].reshape(-1, H, hd)[: lens[r]]  # (L, H, hd)
    vs = v_pool[table[r].long()].reshape(-1, H, hd)[: lens[r]]
    w = torch.softmax(torch.einsum("hd,lhd->hl", q[r], ks) * hd**-0.5, dim=-1)
    want.append(torch.einsum("hl,lhd->hd", w, vs))
want = torch.stack(want)
out = {}
for parts in (1, 2, 4):  # programs per (row, head): all splits in one, two, one per split
    paged_attention.PARTS = parts
    got = paged_attention.paged_decode(q, k_pool, v_pool, table, lens)
    out[parts] = [(got - want).abs().max().item(), want.abs().max().item()]
print(json.dumps(out))
"""


def test_paged_decode_kernel_equals_plain_attention_on_ragged_rows() -> None:
    """Rows of 1 token, one block, a partial block, split boundaries and the full row, with one,
    two and one-per-split programs per (row, head), over a shuffled block pool."""
    out = _run([1, 16, 23, 512, 513, 1100, 1280], PAGED_SCRIPT)
    assert set(out) == {"1", "2", "4"}
    for err, scale in out.values():
        assert scale > 0.1 and err <= 1e-5, (err, scale)
