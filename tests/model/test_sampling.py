"""Decoding helpers (model.sampling): the vectorised n-gram ban against its literal port of the
official processor, and the loop detector / repetition score on real-shaped token streams."""

from __future__ import annotations

import random

import pytest
import torch

from model.engine_config import NGRAM_WHITELIST
from model.sampling import (
    TABLE_TOKEN_IDS,
    no_repeat_ngram_mask,
    no_repeat_ngram_mask_reference,
    repetition_flags,
    repetition_score,
)

VOCAB = 129280  # DeepSeek-OCR's LM vocabulary; <td> </td> <tr> </tr> = 128821..128824
TD, TD_END, TR, TR_END = TABLE_TOKEN_IDS


def _batch(seqs: list[list[int]], T: int, pad: torch.Tensor | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned (B, T) buffer; `pad` fills the lanes past each length (must never be read)."""
    if isinstance(pad, int):
        buf = torch.full((len(seqs), T), pad, dtype=torch.long)
    else:
        buf = pad.clone()
    for b, s in enumerate(seqs):
        if s:
            buf[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return buf, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def _banned(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


# ---------------------------------------------------------------- no_repeat_ngram_mask


def test_ngram_mask_equals_reference_on_random_batches() -> None:
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    n_banned = 0
    for _ in range(600):
        n = rng.choice([1, 2, 3, 4, 5, 7])
        window = rng.choice([1, 2, 3, 5, 8, 13, 40])
        V = rng.choice([2, 3, 5, 12])  # tiny vocabularies make repeats (and bans) frequent
        B, T = rng.randint(1, 6), rng.randint(1, 48)
        lengths = [rng.choice([0, 1, n - 1, n, T, rng.randint(0, T)]) for _ in range(B)]
        lengths = [max(0, min(T, L)) for L in lengths]
        # ids may equal V (outside the vocabulary: never banned, like the official processor)
        alphabet = rng.choice([2, V + 1])  # a 2-letter alphabet repeats n-grams often
        seqs = [[rng.randrange(alphabet) for _ in range(L)] for L in lengths]
        whitelist = rng.sample(range(V), k=rng.randint(0, min(2, V)))
        pad = torch.randint(0, V, (B, T), generator=gen)  # padding that would create matches if read
        tokens, lens = _batch(seqs, T, pad)
        mask = no_repeat_ngram_mask(tokens, lens, n, window, torch.tensor(whitelist, dtype=torch.long), V)
        assert mask.shape == (B, V) and mask.dtype == torch.bool
        ref = no_repeat_ngram_mask_reference(seqs, n, window, whitelist, V)
        assert _banned(mask) == ref, (n, window, V, T, seqs, whitelist)
        n_banned += sum(map(len, ref))
    assert n_banned > 100  # the comparison exercised real bans, not just empty masks


def test_ngram_mask_official_settings_on_a_loop() -> None:
    """n=20 / window=50 with the <td></td> whitelist (official PDF script) on vocab-sized ids."""
    rng = random.Random(7)
    prose = [rng.randrange(1000, 100000) for _ in range(120)]
    period = [rng.randrange(1000, 100000) for _ in range(9)]
    looping = prose + period * 6  # the last 19 tokens recur inside the window: next token is banned
    table = prose + [TR, TD, TD_END, TD, TD_END, TR_END] * 10  # loops only through whitelisted ids?
    fresh = [rng.randrange(1000, 100000) for _ in range(200)]
    short = fresh[:19]  # shorter than n: nothing to ban
    seqs = [looping, table, fresh, short]
    wl = torch.tensor(NGRAM_WHITELIST)
    tokens, lens = _batch(seqs, 256, pad=period[0])
    mask = no_repeat_ngram_mask(tokens, lens, 20, 50, wl, VOCAB)
    got = _banned(mask)
    assert got == no_repeat_ngram_mask_reference(seqs, 20, 50, NGRAM_WHITELIST, VOCAB)
    assert got[0] == {
        period[(len(looping) - len(prose)) % 9]
    }  # exactly the token that would continue the loop
    assert got[1] <= {TR, TR_END} and not got[1] & set(NGRAM_WHITELIST)
    assert got[2] == set() and got[3] == set()
    # n == 1 is a no-op in the official processor (`out[-0:]` quirk); window < n can hold no n-gram
    assert not no_repeat_ngram_mask(tokens, lens, 1, 50, wl, VOCAB).any()
    assert not no_repeat_ngram_mask(tokens, lens, 20, 19, wl, VOCAB).any()
    # only the last `window` tokens count: a loop that ended long ago bans nothing
    old = period * 6 + fresh
    t2, l2 = _batch([old], len(old))
    assert not no_repeat_ngram_mask(t2, l2, 5, 50, wl, VOCAB).any()
    assert no_repeat_ngram_mask(t2, l2, 5, len(old), wl, VOCAB).any() == bool(
        no_repeat_ngram_mask_reference([old], 5, len(old), NGRAM_WHITELIST, VOCAB)[0]
    )


# ---------------------------------------------------------------- repetition_flags / score


def _flags_reference(seq, min_period, max_period, min_span, min_repeats, exempt, exempt_min_span) -> bool:
    """The docstring's definition, literally, per row."""
    L = len(seq)
    periodic = False
    for p in range(min_period, max_period + 1):
        span = max(min_span, min_repeats * p)
        if L >= span and all(seq[j] == seq[j - p] for j in range(L - (span - p), L)):
            periodic = True
    S = max(max(min_span, min_repeats * p) - p for p in range(min_period, max_period + 1))
    m = min(min_span, S)
    structural = bool(exempt) and L >= m and all(t in exempt for t in seq[L - m :])
    flagged = periodic and not structural
    if exempt and exempt_min_span is not None:
        flagged = flagged or (L >= exempt_min_span and all(t in exempt for t in seq[L - exempt_min_span :]))
    return flagged


def test_repetition_flags_real_cases() -> None:
    rng = random.Random(3)
    prose = [rng.randrange(0, 100000) for _ in range(150)]
    period7 = [rng.randrange(0, 100000) for _ in range(7)]
    cells = [TD, TD_END]
    rows = {
        "loop300": prose + (period7 * 50)[:300],  # period-7 loop over 300 tokens
        "loop256": prose + (period7 * 50)[:256],  # exactly min_span: flagged
        "loop255": prose + (period7 * 50)[:255],  # one short of min_span: not yet
        "random": [rng.randrange(0, 100000) for _ in range(1500)],
        "short": period7 * 10,  # a loop, but only 70 tokens
        "empty": [],
        "cells300": prose + cells * 150,  # empty table cells: legit structure, exempt below 4096
        "cells_then_loop": prose + cells * 150 + (period7 * 50)[:300],
        "line_loop": prose + ([rng.randrange(0, 100000) for _ in range(100)] * 5),  # 100-token line x5
    }
    want = {
        "loop300": True,
        "loop256": True,
        "loop255": False,
        "random": False,
        "short": False,
        "empty": False,
        "cells300": False,
        "cells_then_loop": True,
        "line_loop": True,
    }
    seqs = list(rows.values())
    tokens, lens = _batch(seqs, 1600, pad=period7[0])
    got = dict(zip(rows, repetition_flags(tokens, lens).tolist()))
    assert got == want
    # the periods found are the real ones: capping max_period below 7 misses the period-7 loop
    assert not repetition_flags(tokens, lens, max_period=6)[0]
    # a long enough run of exempt tokens is flagged after all (and never, with None)
    assert repetition_flags(tokens, lens, exempt_min_span=300).tolist()[6] is True
    assert repetition_flags(tokens, lens, exempt_min_span=301).tolist()[6] is False
    assert repetition_flags(tokens, lens, exempt_min_span=None).tolist()[6] is False
    # without exemptions a <td></td> run is just a period-2 loop; tensor ids behave like ints
    assert repetition_flags(tokens, lens, exempt_ids=()).tolist()[6] is True
    assert repetition_flags(tokens, lens, exempt_ids=torch.tensor(TABLE_TOKEN_IDS)).tolist() == list(
        want.values()
    )
    with pytest.raises(ValueError):
        repetition_flags(tokens, lens, min_period=5, max_period=4)
    with pytest.raises(ValueError):
        repetition_flags(tokens, lens, min_repeats=1)


def test_repetition_flags_default_exempt_span() -> None:
    prose = list(range(1000, 1100))
    cells = [TD, TD_END] * 2100  # 4200 table tokens >= exempt_min_span 4096
    tokens, lens = _batch([prose + cells, prose + cells[:4000]], 4400)
    assert repetition_flags(tokens, lens).tolist() == [True, False]


def test_repetition_flags_equals_definition_on_random_rows() -> None:
    rng = random.Random(99)
    gen = torch.Generator().manual_seed(99)
    flagged = total = 0
    for _ in range(250):
        minp = rng.randint(1, 3)
        maxp = rng.randint(minp, 9)
        min_span, min_rep = rng.randint(1, 30), rng.randint(2, 5)
        exempt = rng.choice([(), (50, 51), (50,)])
        ems = rng.choice([None, 5, 20, 40])
        B, T = rng.randint(1, 6), rng.randint(1, 64)
        seqs = []
        for _ in range(B):
            L = rng.randint(0, T)
            head = [rng.randrange(100) for _ in range(rng.randint(0, L // 3))]
            kind = rng.random()
            if kind < 0.3:
                body = [rng.randrange(4) for _ in range(L)]
            elif kind < 0.7:
                body = [rng.randrange(100) for _ in range(rng.randint(1, 10))] * 64
            else:
                body = rng.choice([[50, 51], [50], [51, 50, 50]]) * 64
            seqs.append((head + body)[:L])
        tokens, lens = _batch(seqs, T, torch.randint(0, 100, (B, T), generator=gen))
        got = repetition_flags(tokens, lens, minp, maxp, min_span, min_rep, exempt, ems).tolist()
        want = [_flags_reference(s, minp, maxp, min_span, min_rep, set(exempt), ems) for s in seqs]
        assert got == want, (minp, maxp, min_span, min_rep, exempt, ems, seqs)
        flagged += sum(want)
        total += B
    assert 0.1 * total < flagged < 0.9 * total


def test_repetition_score() -> None:
    rng = random.Random(5)
    distinct = rng.sample(range(100000), 500)
    assert repetition_score(distinct) == 0.0
    assert repetition_score([rng.randrange(50000) for _ in range(2000)]) < 0.01
    loop = [rng.randrange(100000) for _ in range(7)] * 43  # period 7 over ~300 tokens
    assert repetition_score(loop) > 0.95
    assert repetition_score(loop[:7] * 4 + distinct[:20]) < repetition_score(loop)
    r = 10  # a period-p loop repeated r times scores ~1 - 1/r
    assert repetition_score(distinct[:50] * r) == pytest.approx(1 - 1 / r, abs=0.03)
    assert repetition_score([]) == 0.0 and repetition_score([1] * 10) == 0.0  # fewer than 2 n-grams
    assert 0.0 <= repetition_score([1, 2] * 100, n=3) <= 1.0


def test_ngram_mask_per_row_parameters_equal_per_row_calls() -> None:
    """Per-row n and window (the engine mixes normal pages and fallback pages in one batch) give,
    row by row, the scalar call's result."""
    from model.sampling import no_repeat_ngram_mask

    g = torch.Generator().manual_seed(7)
    B, T, V = 6, 120, 12
    tokens = torch.randint(0, 5, (B, T), generator=g)
    lengths = torch.tensor([0, 3, 40, 80, 119, 120])
    n = torch.tensor([2, 3, 20, 5, 12, 1])
    w = torch.tensor([5, 50, 50, 90, 200, 50])
    wl = torch.tensor([1])
    got = no_repeat_ngram_mask(tokens, lengths, n, w, wl, V, max_ngram=20, max_window=200)
    for b in range(B):
        ref = no_repeat_ngram_mask(tokens[b : b + 1], lengths[b : b + 1], int(n[b]), int(w[b]), wl, V)
        assert torch.equal(got[b], ref[0]), b
