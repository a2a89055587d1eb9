"""Plain greedy generation for one sequence: one prefill, then one token per step over a KV cache.

This is the simple reference loop (nanochat's naive `generate`): the batched engine must match it
token for token. It syncs with the host once per step (the EOS check) - fine here, not in the engine.
Repetition control is the official windowed no-repeat-n-gram ban (spec §6) over the generated
tokens only, from `model.sampling` (imported lazily; ngram_size=0 disables it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.engine_config import FinishReason

if TYPE_CHECKING:
    from model.ocr import OcrModel


@dataclass
class GenerationResult:
    ids: list[int]  # generated ids; ends with eos_id when finish_reason == "stop"
    finish_reason: FinishReason  # stop (eos emitted) | length (max_new_tokens reached)
    prompt_len: int
    step_logits: list[Tensor] = field(default_factory=list)  # (V,) fp32 model logits per step, if asked


@torch.inference_mode()
def greedy_generate(
    model: OcrModel,
    input_ids: Sequence[int] | Tensor,
    image_embeds: Tensor | None,
    max_new_tokens: int,
    eos_id: int,
    ngram_size: int = 20,
    ngram_window: int = 50,
    whitelist: Sequence[int] = (128821, 128822),
    *,
    return_logits: bool = False,
) -> GenerationResult:
    """Greedy decode after the prompt `input_ids` (L,) whose `<image>` run gets `image_embeds`.

    `step_logits[s]` (with return_logits) are the raw model logits of step s, before the n-gram
    ban; step 0 is the prompt's last position.
    """
    dec = model.decoder
    dev = dec.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=dev).reshape(1, -1)  # (1, L)
    L, V = ids.shape[1], dec.config.vocab_size
    cache = dec.make_cache(1, L + max_new_tokens)
    out = torch.zeros(1, max(max_new_tokens, 1), dtype=torch.long, device=dev)  # generated tokens
    wl = torch.as_tensor(list(whitelist), dtype=torch.long, device=dev)
    if ngram_size:
        from model.sampling import no_repeat_ngram_mask  # noqa: PLC0415 - optional dependency, lazy

    positions = torch.arange(L, device=dev)[None]  # (1, L)
    logits = model(
        ids, positions, image_embeds, cache, logits_index=torch.tensor([L - 1], device=dev)
    )  # (1, V)
    result = GenerationResult([], FinishReason.length, L)
    for step in range(max_new_tokens):
        if return_logits:
            result.step_logits.append(logits[0].clone())
        if ngram_size:
            lengths = torch.tensor([step], device=dev)
            banned = no_repeat_ngram_mask(out, lengths, ngram_size, ngram_window, wl, V)  # (1, V)
            logits = logits.masked_fill(banned, float("-inf"))
        tok = logits.argmax(dim=-1)  # (1,)
        out[:, step] = tok
        tok_id = int(tok)  # host sync: the EOS check
        result.ids.append(tok_id)
        if tok_id == eos_id:
            result.finish_reason = FinishReason.stop
            break
        if step + 1 == max_new_tokens:
            break
        pos = torch.full((1, 1), L + step, dtype=torch.long, device=dev)  # (1, 1)
        logits = model(tok[:, None], pos, None, cache)[:, 0]  # (1, V)
    return result
