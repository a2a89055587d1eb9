"""Continuous-batching engine vs the plain one-sequence greedy loop (tiny config, CPU).

The engine must produce the same greedy tokens whether a page runs alone, in a static batch, or
joins a running batch as others finish (fewer rows than requests forces admission mid-decode).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import OcrConfig
from model.engine import Engine, Request
from model.engine_config import EngineConfig, KvLayout
from model.generate import greedy_generate
from model.ocr import OcrModel
from model.preprocess import preprocess_image
from model.synth import init_random
from model.tokenizer import DEFAULT_PROMPT, OcrTokenizer
from model.vision import PageViews

SIZES_MODES = [
    ((900, 1200), "gundam"),
    ((500, 400), "gundam"),
    ((700, 300), "base"),
    ((800, 800), "tiny"),
    ((1300, 600), "gundam"),
    ((640, 640), "small"),
]


@pytest.fixture(scope="module")
def tiny_model() -> OcrModel:
    torch.manual_seed(0)
    model = OcrModel(OcrConfig.tiny())
    init_random(model, seed=3)
    return model.eval()


@pytest.fixture(scope="module")
def requests_() -> list[tuple[list[int], PageViews]]:
    tok = OcrTokenizer.default()
    rng = np.random.default_rng(0)
    out = []
    for (w, h), mode in SIZES_MODES:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        prep = preprocess_image(img, mode)
        g, tiles = prep.pixel_tensors()
        out.append(
            (tok.build_prompt_ids(DEFAULT_PROMPT, prep.num_image_tokens), PageViews(g, tiles, prep.grid))
        )
    return out


def _reference(model, reqs, max_new):
    res = []
    for ids, views in reqs:
        emb = model.image_embeddings(*views)
        res.append(
            greedy_generate(model, ids, emb, max_new_tokens=max_new, eos_id=1, ngram_size=5, ngram_window=12)
        )
    return res


@pytest.mark.parametrize("max_batch,sync_every", [(1, 1), (6, 4), (4, 3), (2, 8)])
def test_engine_matches_one_at_a_time(tiny_model, requests_, max_batch: int, sync_every: int) -> None:
    max_new = 24
    ref = _reference(tiny_model, requests_, max_new)
    cfg = EngineConfig(
        max_batch=max_batch,
        max_model_len=2048,
        max_new_tokens=max_new,
        ngram_size=5,
        ngram_window=12,
        loop_detect=False,
        sync_every=sync_every,
        len_bucket=64,
        prefill_tokens=2500,
    )
    got = Engine(tiny_model, cfg).run(Request(ids, views) for ids, views in requests_)
    assert [g.ids for g in got] == [r.ids for r in ref]
    assert [g.finish_reason for g in got] == [r.finish_reason for r in ref]


def test_grouped_admission_waits_for_free_rows_and_keeps_tokens(tiny_model, requests_) -> None:
    """admit_min: after the first fill, pages join only in groups (vision/prefill on bigger
    batches); the tokens are those of admitting every page as soon as a row frees."""
    # distinct lengths, sync_every apart: without grouping, rows free one at a time
    reqs = [(ids, views, 3 + 2 * i) for i, (ids, views) in enumerate(requests_ * 4)]

    def run(admit_min: int) -> tuple[list[list[int]], list[int]]:
        cfg = EngineConfig(
            max_batch=16,
            max_model_len=2048,
            max_new_tokens=64,
            ngram_size=5,
            ngram_window=12,
            loop_detect=False,
            sync_every=2,
            len_bucket=64,
            admit_min=admit_min,
        )
        engine = Engine(tiny_model, cfg)
        got = engine.run(Request(ids, views, force_len=n) for ids, views, n in reqs)
        return [g.ids for g in got], engine.stats.admissions

    eager_ids, eager_adm = run(1)
    grouped_ids, grouped_adm = run(2)  # capped at max_batch // 8 = 2
    assert grouped_ids == eager_ids
    assert [len(i) for i in grouped_ids] == [n for _, _, n in reqs]
    assert grouped_adm[0] == 16 and sum(grouped_adm) == len(reqs)
    assert all(a >= 2 for a in grouped_adm[1:-1])  # the last group may be what is left
    assert 1 in eager_adm[1:]  # without grouping, single pages are admitted


def test_eos_stops_a_row_and_frees_it(tiny_model, requests_) -> None:
    """Use a token the reference emits at step 3 as 'EOS': rows stop there, others run on."""
    ids, views = requests_[0]
    ref = _reference(tiny_model, [requests_[0]], 16)[0]
    eos = ref.ids[3]
    first = ref.ids.index(eos)
    cfg = EngineConfig(
        max_batch=2,
        max_model_len=2048,
        max_new_tokens=16,
        ngram_size=5,
        ngram_window=12,
        loop_detect=False,
        eos_id=eos,
        sync_every=2,
        len_bucket=64,
    )
    got = Engine(tiny_model, cfg).run([Request(ids, views), Request(ids, views), Request(ids, views)])
    for g in got:
        assert g.finish_reason == "stop"
        assert g.ids == ref.ids[: first + 1]
        assert g.num_output_tokens == first


def test_forced_length_ignores_eos_and_loops(tiny_model, requests_) -> None:
    ids, views = requests_[1]
    ref = _reference(tiny_model, [requests_[1]], 8)[0]
    cfg = EngineConfig(
        max_batch=2,
        max_model_len=2048,
        max_new_tokens=100,
        ngram_size=5,
        ngram_window=12,
        eos_id=ref.ids[0],
        sync_every=4,
        len_bucket=64,
        loop_min_span=8,
    )
    got = Engine(tiny_model, cfg).run([Request(ids, views, force_len=37), Request(ids, views, force_len=5)])
    assert [len(g.ids) for g in got] == [37, 5]
    assert all(g.finish_reason == "length" for g in got)
    assert ref.ids[0] not in got[0].ids[:36]  # EOS never chosen before the forced end


def _looping_copy(model: OcrModel) -> OcrModel:
    """The tiny model with every residual branch zeroed and lm_head tied to the embedding: the
    logits are E . norm(E[last]), so greedy repeats its last token forever (a guaranteed loop)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        # submodules reached through nn.Module attributes are typed `Tensor | Module`: go untyped here
        for layer in cast(Iterable[Any], m.decoder.layers):
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            for p in (
                [mlp.experts.down_proj, mlp.shared_experts.down_proj.weight]
                if hasattr(mlp, "experts")
                else [mlp.down_proj.weight]
            ):
                p.zero_()
        m.decoder.lm_head.weight.copy_(m.decoder.embed_tokens.weight)
    return m


def test_loop_detector_stops_repetition(tiny_model, requests_) -> None:
    ids, views = requests_[2]
    looping = _looping_copy(tiny_model)
    ref = greedy_generate(
        looping, ids, looping.image_embeddings(*views), max_new_tokens=300, eos_id=1, ngram_size=0
    )
    assert len(set(ref.ids[1:])) == 1 and ref.finish_reason == "length"  # the fixture really loops
    cfg = EngineConfig(
        max_batch=2,
        max_model_len=2048,
        max_new_tokens=300,
        ngram_size=0,
        sync_every=1,
        len_bucket=64,
        loop_min_span=32,
    )
    (got,) = Engine(looping, cfg).run([Request(ids, views)])
    assert got.finish_reason == "repetition"
    assert 32 <= len(got.ids) <= 40  # stopped once 32 tokens of exact loop were seen
    assert got.ids == ref.ids[: len(got.ids)]
    # with the n-gram ban on, the same model is pushed out of the period-1 loop by the ban
    cfg_ban = EngineConfig(
        max_batch=2,
        max_model_len=2048,
        max_new_tokens=60,
        ngram_size=3,
        ngram_window=40,
        sync_every=1,
        len_bucket=64,
        loop_min_span=32,
    )
    (banned,) = Engine(looping, cfg_ban).run([Request(ids, views)])
    assert len(set(banned.ids)) > 1


def test_prompt_too_long_is_an_error_result(tiny_model, requests_) -> None:
    ids, views = requests_[0]
    cfg = EngineConfig(max_batch=2, max_model_len=len(ids), max_new_tokens=4)
    (got,) = Engine(tiny_model, cfg).run([Request(ids, views)])
    assert got.finish_reason == "error" and got.error is not None and "max_model_len" in got.error


def test_per_request_ngram_settings_in_one_batch(tiny_model, requests_) -> None:
    """Fallback pages (stronger ban) share the batch with normal pages: each gets what it would
    get from an engine configured with its own settings."""
    reqs = requests_[:4]
    base: dict[str, Any] = dict(
        max_batch=4, max_model_len=2048, max_new_tokens=30, loop_detect=False, sync_every=3, len_bucket=64
    )
    weak = Engine(tiny_model, EngineConfig(ngram_size=8, ngram_window=20, **base)).run(
        [Request(i, v) for i, v in reqs]
    )
    strong = Engine(tiny_model, EngineConfig(ngram_size=3, ngram_window=30, **base)).run(
        [Request(i, v) for i, v in reqs]
    )
    mixed = Engine(
        tiny_model, EngineConfig(ngram_size=8, ngram_window=20, ngram_max_size=8, ngram_max_window=30, **base)
    ).run(
        [
            Request(i, v, ngram_size=3 if k % 2 else None, ngram_window=30 if k % 2 else None)
            for k, (i, v) in enumerate(reqs)
        ]
    )
    assert [m.ids for m in mixed] == [(strong if k % 2 else weak)[k].ids for k in range(len(reqs))]
    assert weak[1].ids != strong[1].ids  # the settings really differ in effect


def test_page_ocr_submit_from_concurrent_callers_equals_run(tiny_model, requests_) -> None:
    """The serving thread (what the async OCR stage uses): pages submitted from several threads at
    once share the engine and get the same results as a plain run."""
    import threading

    from model.runner import OcrInput, OcrOutput, PageOcr
    from model.tokenizer import OcrTokenizer

    rng = np.random.default_rng(1)
    inputs = []
    for (w, h), mode in SIZES_MODES:
        prep = preprocess_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), mode)
        inputs.append(OcrInput.from_views(prep, tag=len(inputs)))
    cfg = EngineConfig(
        max_batch=3,
        max_model_len=2048,
        max_new_tokens=12,
        ngram_size=5,
        ngram_window=12,
        ngram_max_size=5,
        ngram_max_window=20,
        sync_every=2,
        len_bucket=64,
    )
    ocr = PageOcr(tiny_model, OcrTokenizer.default(), cfg)
    ref = ocr.run(inputs)
    got: dict[int, OcrOutput] = {}

    def caller(part: list[OcrInput]) -> None:
        futs = [ocr.submit(x) for x in part]
        for x, f in zip(part, futs):
            got[x.tag] = f.result(timeout=300)

    threads = [threading.Thread(target=caller, args=(inputs[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i].ids for i in range(len(inputs))] == [r.ids for r in ref]
    assert [got[i].raw_output for i in range(len(inputs))] == [r.raw_output for r in ref]


def test_paged_engine_with_preemption_matches_one_at_a_time(tiny_model, requests_) -> None:
    """Paged KV: mixed prompt/output lengths, a pool so small that rows are preempted (requeued and
    recomputed), fallback-pass pages (their own n-gram ban) in the same batch: every page gets the
    tokens of the one-page-at-a-time reference, and none is lost."""
    lens = [30, 300, 200, 250, 12, 280]
    fallback = {1, 4}  # these pages run with the fallback ban (stronger, wider window)
    ref = []
    for k, (ids, views) in enumerate(requests_):
        ng = (3, 30) if k in fallback else (5, 12)
        emb = tiny_model.image_embeddings(*views)
        ref.append(
            greedy_generate(
                tiny_model, ids, emb, max_new_tokens=lens[k], eos_id=-1, ngram_size=ng[0], ngram_window=ng[1]
            ).ids
        )
    longest = max(len(ids) for ids, _ in requests_) + max(lens)
    bs = 16
    per_row = -(-longest // bs)
    cfg = EngineConfig(
        max_batch=6,
        max_model_len=longest,
        max_new_tokens=max(lens),
        ngram_size=5,
        ngram_window=12,
        ngram_max_size=5,
        ngram_max_window=30,
        loop_detect=False,
        sync_every=3,
        len_bucket=16,
        eos_id=-1,
        kv_block_size=bs,
        kv_blocks=per_row + 20,
        kv_watermark=0.0,
        expect_new_tokens=1,
        admit_min=1,
    )
    engine = Engine(tiny_model, cfg)
    assert engine.paged
    got = engine.run(
        Request(
            ids,
            views,
            max_new_tokens=lens[k],
            ngram_size=3 if k in fallback else None,
            ngram_window=30 if k in fallback else None,
        )
        for k, (ids, views) in enumerate(requests_)
    )
    assert [g.ids for g in got] == ref
    assert engine.stats.preemptions > 0  # the pool really ran dry
    assert max(n for _, n in engine.stats.blocks_used) <= cfg.kv_blocks - 1
    assert engine.stats.pages == len(requests_)


def test_paged_admission_is_limited_by_free_blocks(tiny_model, requests_) -> None:
    """With more row slots than the pool can feed, admission stops at the blocks, not at max_batch."""
    ids, views = requests_[3]
    bs = 16
    per_row = -(-(len(ids) + 20) // bs)
    cfg = EngineConfig(
        max_batch=8,
        max_model_len=len(ids) + 20,
        max_new_tokens=20,
        ngram_size=5,
        ngram_window=12,
        loop_detect=False,
        sync_every=2,
        len_bucket=16,
        kv_block_size=bs,
        kv_blocks=2 * per_row + 1,
        kv_watermark=0.0,
        admit_min=1,
    )
    engine = Engine(tiny_model, cfg)
    got = engine.run([Request(ids, views, force_len=20) for _ in range(5)])
    assert [len(g.ids) for g in got] == [20] * 5 and len({tuple(g.ids) for g in got}) == 1
    assert max(n for _, n in engine.stats.occupancy) == 2  # two rows' worth of blocks, 8 row slots
    assert engine.stats.preemptions == 0  # forced lengths are reserved exactly: nothing to evict


def test_paged_pool_smaller_than_one_row_is_refused(tiny_model) -> None:
    with pytest.raises(ValueError, match="cannot hold one row"):
        Engine(tiny_model, EngineConfig(max_batch=2, max_model_len=256, kv_block_size=16, kv_blocks=16))


def test_engine_layout_is_an_enum() -> None:
    """`EngineConfig.engine` is a KvLayout member (a caller's plain string becomes the member, so
    stored configs keep the string); anything else is refused naming the layouts."""
    assert EngineConfig().engine is KvLayout.paged
    plain: Any = "slotted"  # as read from json or a command line
    assert EngineConfig(engine=plain).engine is KvLayout.slotted
    with pytest.raises(ValueError, match="engine must be one of paged, slotted, not 'pagged'"):
        EngineConfig(engine=cast(Any, "pagged"))


@pytest.mark.parametrize("engine", list(KvLayout))
def test_both_engines_give_the_same_tokens(tiny_model, requests_, engine: KvLayout) -> None:
    ref = _reference(tiny_model, requests_[:4], 16)
    cfg = EngineConfig(
        max_batch=3,
        max_model_len=2048,
        max_new_tokens=16,
        ngram_size=5,
        ngram_window=12,
        loop_detect=False,
        sync_every=4,
        len_bucket=64,
        engine=engine,
    )
    got = Engine(tiny_model, cfg).run(Request(ids, views) for ids, views in requests_[:4])
    assert [g.ids for g in got] == [r.ids for r in ref]


@pytest.mark.parametrize("vision_ahead", [0, 2, 64])
def test_vision_ahead_keeps_tokens_with_a_live_feed(tiny_model, requests_, vision_ahead: int) -> None:
    """Pages encoded ahead of admission (EngineConfig.vision_ahead; on CUDA on a second stream),
    pulled from a live feed that sometimes has nothing queued, with more row slots than pages
    (the step runs over the low row slots only): the same greedy tokens as one page at a time.
    The engine drops each page's views once encoded."""
    ref = _reference(tiny_model, requests_, 12)
    cfg = EngineConfig(
        max_batch=16,
        max_model_len=2048,
        max_new_tokens=12,
        ngram_size=5,
        ngram_window=12,
        loop_detect=False,
        sync_every=2,
        len_bucket=64,
        admit_min=1,
        vision_ahead=vision_ahead,
    )
    engine = Engine(tiny_model, cfg)
    reqs = [Request(ids, views, tag=k) for k, (ids, views) in enumerate(requests_)]
    pulled: list[int] = []
    results: list[Any] = []

    def feed() -> Iterable[Request | None]:
        for k, r in enumerate(reqs):
            if k % 2:
                yield None  # nothing queued right now
            pulled.append(k)
            yield r

    for res in engine.generate(feed()):
        results.append(res)
    got = sorted(results, key=lambda r: r.tag)
    assert [g.ids for g in got] == [r.ids for r in ref]
    assert all(r.views is None and r.image is not None for r in reqs)
    assert engine.stats.pages == len(reqs) and engine.stats.vision_s > 0


def test_vision_ahead_pulls_a_bounded_number_of_pages(tiny_model, requests_) -> None:
    """One row slot, look-ahead of 2: at any pull, pages pulled minus pages retired stay within
    the row plus the look-ahead (the feed is not drained into device memory)."""
    cfg = EngineConfig(
        max_batch=1,
        max_model_len=2048,
        max_new_tokens=4,
        ngram_size=5,
        ngram_window=12,
        loop_detect=False,
        sync_every=2,
        admit_min=1,
        vision_ahead=2,
    )
    retired = 0
    in_flight: list[int] = []

    def feed() -> Iterable[Request | None]:
        for k, (ids, views) in enumerate(requests_ * 2):
            in_flight.append(k + 1 - retired)  # pages pulled (this one included) minus retired
            yield Request(ids, views, tag=k)

    for _ in Engine(tiny_model, cfg).generate(feed()):
        retired += 1
    assert retired == 2 * len(requests_)
    assert max(in_flight) == 1 + 2
