"""The engine's settings and its result vocabulary, without torch: `pipeline.config` and every Ray
worker that only needs a config (render, write, feed, probe actors) import this, not
`model.engine`, so they do not pay torch's import (about a second a process, several on a loaded
machine). `model.engine` re-exports every name."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import StrEnum

NGRAM_WHITELIST = (128821, 128822)  # <td> </td>: the official ban whitelist


class FinishReason(StrEnum):
    """Why a request ended (the `finish_reason` of a result and of a stored page row)."""

    stop = "stop"  # the model emitted EOS
    length = "length"  # max new tokens / model length reached
    repetition = "repetition"  # the loop detector flagged the tail
    error = "error"  # the request could not run (`Result.error` says why)


class KvLayout(StrEnum):
    """`EngineConfig.engine`: how the KV cache is laid out (see the module docstring)."""

    paged = "paged"  # a pool of fixed-size blocks shared by the rows (default)
    slotted = "slotted"  # one max_model_len row per sequence (the previous engine, kept to compare)


# the device state's codes: 0 = the row is still running (in flight, never on a Result)
DEVICE_FINISH = {1: FinishReason.stop, 2: FinishReason.length, 3: FinishReason.repetition}
# paged engine, max_batch=None (auto): row slots; a row costs ~70 KiB of state, the block pool does the limiting
PAGED_AUTO_ROWS = 1024


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 64  # sequences in flight (KV rows); ~60 KiB/token each on the full model
    max_model_len: int = 8192  # prompt + output per sequence (official max_model_len)
    max_new_tokens: int = 8192  # also capped by max_model_len - prompt length
    ngram_size: int = 20  # official PDF script: windowed no-repeat n-gram ban 20 / 50
    ngram_window: int = 50
    # static bounds of per-request n-gram settings (a fallback pass may ask for other ones);
    # 0 = the defaults above. They fix the ban's tensor shapes (graph capture).
    ngram_max_size: int = 0
    ngram_max_window: int = 0
    whitelist: tuple[int, ...] = NGRAM_WHITELIST  # <td> </td> are never banned
    loop_detect: bool = True  # stop exact loops early (finish_reason "repetition")
    loop_min_span: int = 256  # tokens of exact periodic tail that count as a loop
    eos_id: int = 1
    sync_every: int = 8  # decode steps between host looks at the device state
    len_bucket: int = 256  # attention reads the cache up to a multiple of this
    vision_batch: int = 32  # views per SAM/CLIP forward
    prefill_tokens: int = 16384  # padded prompt tokens per prefill forward
    static_batches: bool = False  # baseline only: admit a new batch only when all rows are done
    # admit new pages once this many rows are free (capped at max_batch // 8): admitting one or two
    # pages per sync runs SAM/CLIP and prefill on tiny batches (H100: ~33 ms/page of vision vs
    # ~20 ms/page in batches of 64); waiting for a group costs a few idle rows for a few steps
    admit_min: int = 16
    cuda_graphs: bool = True  # on CUDA, replay the decode step from a graph per attend length
    # KV layout (issue 13). "paged": a pool of kv_block_size-token blocks shared by max_batch rows,
    # admission limited by free blocks, newest rows preempted (requeued, recomputed) when the pool
    # runs dry. "slotted": one max_model_len row per sequence (the previous engine, kept to compare).
    engine: KvLayout = KvLayout.paged
    kv_block_size: int = 64
    kv_blocks: int = (
        0  # pool size; 0: fit to free CUDA memory (kv_headroom_gib kept), else max_batch rows' worth
    )
    # kept free for vision/prefill activations (both can run beside decode), CUDA graphs, the
    # views of the pages encoded ahead (~20 MB each) and the image embeddings of the rows (~2 MB each)
    kv_headroom_gib: float = 20.0
    admit_max: int = 128  # pages per admission group (bounds vision/prefill activations and views in flight)
    kv_watermark: float = 0.01  # fraction of the pool admission leaves free
    # admission reserves each live row's expected growth: its exact cap when forced, else the mean
    # output length of finished pages (this value until one finishes)
    expect_new_tokens: int = 1024
    # pages pulled and encoded (SAM/CLIP) ahead of admission, on a second CUDA stream of lower
    # priority than decode, so vision overlaps the decode rounds (issue 13); 0: encode at admission,
    # serialised with decode (the previous behaviour). A row keeps only its image embeddings
    # (~2 MB/page), not its views (~20 MB), so a preempted page is not re-encoded.
    vision_ahead: int = 64

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.sync_every < 1 or self.len_bucket < 1 or self.admit_min < 1:
            raise ValueError("max_batch, sync_every, len_bucket and admit_min must be >= 1")
        if self.ngram_size and self.ngram_window < self.ngram_size:
            raise ValueError("ngram_window must be >= ngram_size")
        if self.engine not in KvLayout.values():
            raise ValueError(f"engine must be one of {', '.join(KvLayout.values())}, not {self.engine!r}")
        object.__setattr__(self, "engine", KvLayout(self.engine))  # a plain str from a caller: the member
