"""OcrModel: DeepEncoder (vision) + DeepSeek-V2 decoder, with the image vectors spliced into the
token embeddings at the `<image>` (128815) positions (spec §1.7, 3.6).

Adapted from DeepSeek-OCR's `modeling_deepseekocr.py` (HF remote code).

Decisions:
- Two children only, `vision` and `decoder`; `model/checkpoint.py` maps official keys onto them.
- The vision encoder runs once per page, outside `forward`: callers pass ready `image_embeds`
  (N_img, D) to the prefill step and nothing to decode steps, so `forward` is the same code for
  both and holds no per-page logic.
- Image vectors replace the `<image>` embeddings in order (`masked_scatter`, row-major over the
  batch), so a batched prefill passes the rows' image vectors concatenated in row order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import OcrConfig
from model.decoder import Decoder
from model.kv_cache import KVCache
from model.vision import DeepEncoder


class OcrModel(nn.Module):
    def __init__(self, cfg: OcrConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision = DeepEncoder(cfg)
        self.decoder = Decoder(cfg.decoder)

    @classmethod
    def from_config(cls, cfg: OcrConfig) -> OcrModel:
        return cls(cfg)

    def image_embeddings(self, global_view: Tensor, tiles: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """(N_img, D) vectors for one image's `<image>` run (see DeepEncoder.image_embeddings)."""
        return self.vision.image_embeddings(global_view, tiles, grid)

    def embed(self, input_ids: Tensor, image_embeds: Tensor | None = None) -> Tensor:
        """Token embeddings (B, T, D) with `image_embeds` (N_img, D) written at `<image>` ids."""
        emb = self.decoder.embed_tokens(input_ids)  # (B, T, D)
        if image_embeds is None:
            return emb
        mask = input_ids == self.config.image_token_id  # (B, T)
        # NOTE: host sync, once per prefill (never in decode): a count mismatch would otherwise be
        # silent (masked_scatter reads the first N vectors) or a cryptic error.
        n = int(mask.sum())
        if n != image_embeds.shape[0]:
            raise ValueError(f"{n} <image> positions but {image_embeds.shape[0]} image vectors")
        return emb.masked_scatter(mask[..., None], image_embeds.to(emb.dtype))

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        image_embeds: Tensor | None = None,
        cache: KVCache | None = None,
        logits_index: Tensor | None = None,
    ) -> Tensor:
        """fp32 logits (B, T, V) or (B, V) at `logits_index`; input_ids/positions (B, T)."""
        return self.decoder(self.embed(input_ids, image_embeds), positions, cache, logits_index)

    @torch.no_grad()
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
