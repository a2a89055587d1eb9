"""Decoding helpers as pure tensor functions: windowed no-repeat-n-gram ban and a loop detector.

Adapted from DeepSeek-OCR's `process/ngram_norepeat.py` (the ban; the loop detector is ours).

Both device functions take the per-row GENERATED tokens left-aligned in a fixed (B, T) buffer plus
`lengths` (B,), and use only gathers/unfold/compares with shapes fixed by (B, T) and the Python-int
parameters: no `.item()`, `.tolist()`, data-dependent branches or loops over rows/tokens, so they
can live inside a compiled / CUDA-graph decode step. Padding beyond `lengths[b]` is never read as
data (indices are clamped and the lanes masked out).

- `no_repeat_ngram_mask` reproduces the official windowed processor exactly (spec §6,
  DeepSeek-OCR-vllm `process/ngram_norepeat.py` == vLLM `NoRepeatNGramLogitsProcessor`), including
  its quirk that `ngram_size == 1` is a no-op (`out[-0:]` is the whole list, never equal to `()`).
- `repetition_flags` flags rows whose tail is an exact period-p loop (spec §8: loops burn up to
  8,192 tokens per page); the caller stops them with finish_reason "repetition".
- `repetition_score` is the host-side quality signal for finished pages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

TABLE_TOKEN_IDS = (128821, 128822, 128823, 128824)  # <td> </td> <tr> </tr>: legit long runs


def no_repeat_ngram_mask(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    ngram_size: int | torch.Tensor,
    window: int | torch.Tensor,
    whitelist: torch.Tensor,
    vocab_size: int,
    max_ngram: int | None = None,
    max_window: int | None = None,
) -> torch.Tensor:
    """Banned next tokens (B, vocab_size), True = ban; exact vectorised windowed n-gram ban.

    For row b with L = lengths[b] generated tokens and its n, w: if L >= n >= 2, every
    i in [max(0, L-w), L-n] whose (n-1)-gram out[i:i+n-1] equals the last n-1 tokens bans
    out[i+n-1]; whitelist ids are never banned. `ngram_size`/`window` are ints or per-row (B,)
    tensors (then `max_ngram`/`max_window`, Python ints, bound them: shapes stay static, so the
    call is CUDA-graph safe). Lanes enumerate the banned position j = i+n-1 backwards from L-1;
    cost O(B * min(max_window, T) * max_ngram).
    """
    B, T = tokens.shape
    dev = tokens.device
    N = int(ngram_size) if not isinstance(ngram_size, torch.Tensor) else int(max_ngram or 0)
    W = int(window) if not isinstance(window, torch.Tensor) else int(max_window or 0)
    C = min(W, T)  # static lane count: j = L - 1 - c for c in [0, C)
    mask = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=dev)
    if N < 2 or C <= 0:  # n == 1: the official no-op quirk; no window: nothing to ban
        return mask[:, :vocab_size]
    L = lengths.to(device=dev, dtype=torch.long).view(B, 1)
    n = (
        ngram_size.to(dev).long().view(B, 1)
        if isinstance(ngram_size, torch.Tensor)
        else torch.full_like(L, N)
    )
    w = window.to(dev).long().view(B, 1) if isinstance(window, torch.Tensor) else torch.full_like(L, W)
    k = torch.arange(N - 1, device=dev)  # (K,) offsets back from the end of a gram
    c = torch.arange(C, device=dev)  # (C,)

    prefix = tokens.gather(1, (L - 1 - k).clamp(0, T - 1))  # (B, K): out[L-1-k]
    j = L - 1 - c  # (B, C) position of the token that would repeat
    idx = (j.unsqueeze(-1) - 1 - k).clamp(0, T - 1)  # (B, C, K): out[j-1-k]
    grams = tokens.gather(1, idx.view(B, -1)).view(B, C, N - 1)
    used = k < (n - 1)  # (B, K): only the row's own n-1 offsets count
    match = ((grams == prefix.unsqueeze(1)) | ~used.unsqueeze(1)).all(-1)  # (B, C)
    start = j - (n - 1)  # the gram's first position i
    valid = (start >= 0) & (start >= L - w) & (L >= n) & (n >= 2)
    nxt = tokens.gather(1, j.clamp(0, T - 1))  # (B, C)
    target = torch.where(match & valid, nxt, torch.full_like(nxt, vocab_size))
    mask.scatter_(1, target.clamp(0, vocab_size), True)  # column `vocab_size` = discard slot
    mask = mask[:, :vocab_size]
    if whitelist.numel():
        mask.index_fill_(1, whitelist.to(dev), False)  # no host scalar: graph-capture safe
    return mask


def no_repeat_ngram_mask_reference(
    seqs: Sequence[Sequence[int]],
    ngram_size: int,
    window: int,
    whitelist: Iterable[int],
    vocab_size: int,
) -> list[set[int]]:
    """Literal Python port of the official processor: banned id set per sequence (tests only)."""
    allowed = set(whitelist)
    out: list[set[int]] = []
    for seq in seqs:
        ids = list(seq)
        banned: set[int] = set()
        if len(ids) >= ngram_size:
            prefix = tuple(ids[-(ngram_size - 1) :])
            for i in range(max(0, len(ids) - window), len(ids) - ngram_size + 1):
                gram = tuple(ids[i : i + ngram_size])
                if gram[:-1] == prefix:
                    banned.add(gram[-1])
        out.append({t for t in banned - allowed if 0 <= t < vocab_size})
    return out


def _isin(x: torch.Tensor, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """`torch.isin` without building a tensor from Python ints (no H2D copy inside a CUDA graph)."""
    if isinstance(ids, torch.Tensor):
        return torch.isin(x, ids.to(x.device))
    out = torch.zeros_like(x, dtype=torch.bool)
    for i in ids:  # a handful of static ids, unrolled at trace time
        out = out | (x == i)
    return out


def repetition_flags(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    min_period: int = 1,
    max_period: int = 128,
    min_span: int = 256,
    min_repeats: int = 4,
    exempt_ids: Sequence[int] | torch.Tensor = TABLE_TOKEN_IDS,
    exempt_min_span: int | None = 4096,
) -> torch.Tensor:
    """(B,) bool: the row's tail is an exact loop and generation should stop ("repetition").

    Row b is flagged if, for some period p in [min_period, max_period], its last
    S_p = max(min_span, min_repeats * p) - p tokens each equal the token p positions earlier,
    i.e. the tail of max(min_span, min_repeats * p) tokens is p-periodic.

    Defaults and why:
    - min_span 256: an exact loop covering 256 tokens is >= 25% of a typical page (~1k tokens,
      spec §7) and still saves ~97% of an 8,192-token runaway; legit exact repeats that long
      (e.g. a matrix of zeros, dot leaders) are rare and only cost a flagged page, not a lost one.
    - periods up to 128, >= 4 repeats: the n-gram ban (n=20..30, window 50..90) already breaks
      periods below ~window-n, so what survives is mostly line/paragraph-sized loops (repeated
      headers, rows, spec §8); 4 repeats keeps 3x-repeated legit lines/rows from tripping it.
    - exempt_ids (default: <td></td><tr></tr>; a tensor or Python ints, ints are graph-safe): a tail whose last min_span tokens are all table
      structure (empty cells/rows) is a legit structure, not a loop, and is exempt from the
      periodic test. It is flagged only once the run of exempt tokens reaches exempt_min_span
      (default 4096, ~90 empty rows x 20 columns; None = never), which still halves a table loop.
    Cost: O(B * P * S) compares with P = #periods, S = max_p S_p (~384 with the defaults).
    """
    if not 1 <= min_period <= max_period or min_repeats < 2:
        raise ValueError("need 1 <= min_period <= max_period and min_repeats >= 2")
    B, T = tokens.shape
    dev = tokens.device
    L = lengths.to(device=dev, dtype=torch.long).view(B, 1)
    periods = torch.arange(max_period, min_period - 1, -1, device=dev)  # (P,) order of unfold
    span = torch.clamp(periods * min_repeats, min=min_span)  # (P,) covered tokens required
    need = span - periods  # (P,) tail positions that must equal position - p
    S = int(max(max(min_span, min_repeats * p) - p for p in range(min_period, max_period + 1)))

    # Window of the last S + max_period tokens; positions before the row start get unique negative
    # sentinels so they never compare equal to anything (real ids are >= 0).
    W = S + max_period
    pos = L - W + torch.arange(W, device=dev)  # (B, W)
    win = tokens.gather(1, pos.clamp(0, T - 1))
    win = torch.where(pos >= 0, win, -1 - torch.arange(W, device=dev).expand(B, W))
    views = win.unfold(1, S, 1)  # (B, max_period + 1, S): views[:, o] = tokens[L-S-max_period+o ...]
    tail = views[:, max_period]  # (B, S) the last S tokens
    shifted = views[:, max_period - max_period : max_period - min_period + 1]  # p = max..min
    eq = tail.unsqueeze(1) == shifted  # (B, P, S)
    # run of trailing matches, counted from the end (cumprod of the reversed compare)
    run = eq.flip(-1).to(torch.int32).cumprod(-1).sum(-1)  # (B, P)
    periodic = (run >= need).any(-1)  # (B,)

    if len(exempt_ids) == 0:
        return periodic
    m = min(min_span, S)
    structural = _isin(tail[:, S - m :], exempt_ids).all(-1)  # (B,)
    flags = periodic & ~structural
    if exempt_min_span is not None:
        epos = L - exempt_min_span + torch.arange(exempt_min_span, device=dev)
        run_ex = _isin(tokens.gather(1, epos.clamp(0, T - 1)), exempt_ids) & (epos >= 0)
        flags = flags | run_ex.all(-1)
    return flags


def repetition_score(ids: Sequence[int], n: int = 10) -> float:
    """Host-side: 1 - distinct/total n-grams, in [0, 1]; ~0 for normal text, -> 1 for loops.

    A loop of period p repeated r times scores ~1 - 1/r. n = 10 is long enough that ordinary prose
    and tables with content rarely repeat a whole 10-gram, yet catches loops that the n-gram ban
    turned into near-repeats elsewhere on the page. Empty tables score high: judge with the
    label/markdown, not this number alone.
    """
    total = len(ids) - n + 1
    if total <= 1:
        return 0.0
    distinct = len({tuple(ids[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total
