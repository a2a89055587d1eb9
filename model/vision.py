"""DeepEncoder: SAM-B -> CLIP-L -> linear projector, plus the image token layout (spec §1.3-§1.7, 3.5).

Adapted from DeepSeek-OCR's `deepseek_ocr.py` and `deepencoder/build_linear.py`.

``DeepEncoder.state_dict()`` keys prefixed with ``model.`` are exactly the official vision keys
(``sam_model.*``, ``vision_model.*``, ``projector.layers.*``, ``image_newline``,
``view_seperator`` (sic)), so it loads from the checkpoint by name.

Key decisions:
* One view of side S gives (S/64)^2 tokens; features are concat[CLIP (no CLS), SAM] - CLIP first.
* Layout of one image: local tile mosaic (tiles stitched into one (Ht*h) x (Wt*w) grid, newline
  after every mosaic row), then the global view (newline after every row), then the separator.
* ``image_embeddings_batch`` encodes all equal-size views of several pages in one SAM/CLIP batch
  (tiles of every page together, global views together): the GPU engine's entry point.
* Computation stays in the module dtype (pixels are cast to it); only the position-table
  resizing inside SAM/CLIP runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from model.clip import ClipVisionModel
from model.config import OcrConfig
from model.sam import ImageEncoderViT


class PageViews(NamedTuple):
    """Normalised views of one image: global (3,S,S) or (1,3,S,S); tiles (T,3,s,s) or None;
    grid = (w_tiles, h_tiles), (1, 1) without tiles."""

    global_view: Tensor
    tiles: Tensor | None
    grid: tuple[int, int]


class MlpProjector(nn.Module):
    """projector_type="linear": a single Linear stored as ``projector.layers``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class DeepEncoder(nn.Module):
    def __init__(self, cfg: OcrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder.hidden_size
        self.sam_model = ImageEncoderViT(cfg.sam)
        self.vision_model = ClipVisionModel(cfg.clip)
        self.projector = MlpProjector(cfg.projector_input_dim, d)
        self.image_newline = nn.Parameter(torch.zeros(d))
        self.view_seperator = nn.Parameter(torch.zeros(d))
        self.stride = cfg.sam.patch_size * 4  # patch conv, then two stride-2 convs

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.layers.weight.dtype

    def encode_views(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) normalised pixels -> (B, (S/64)^2, D) projected features, row-major."""
        x = pixels.to(device=self.image_newline.device, dtype=self.dtype)
        sam = self.sam_model(x)  # (B, 1024, h, w)
        clip = self.vision_model(sam)  # (B, 1+h*w, 1024)
        feats = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)  # (B, h*w, 2048)
        return self.projector(feats)  # (B, h*w, D)

    def _with_newlines(self, grid: Tensor) -> Tensor:
        """(R, Cols, D) -> (R*(Cols+1), D): newline appended after every row."""
        R, _, D = grid.shape
        nl = self.image_newline.to(grid.dtype).expand(R, 1, D)
        return torch.cat([grid, nl], dim=1).reshape(-1, D)

    def layout(
        self,
        global_feats: Tensor,
        global_hw: tuple[int, int],
        tile_feats: Tensor | None,
        tile_hw: tuple[int, int],
        grid: tuple[int, int],
    ) -> Tensor:
        """Assemble one image's rows: [mosaic + newlines] + [global + newlines] + [separator].

        global_feats (h*w, D); tile_feats (T, h2*w2, D) with T = w_tiles*h_tiles, or None."""
        D = global_feats.shape[-1]
        parts = []
        if tile_feats is not None:
            wt, ht = grid
            h2, w2 = tile_hw
            t = tile_feats.view(ht, wt, h2, w2, D).permute(0, 2, 1, 3, 4)  # (Ht, h2, Wt, w2, D)
            parts.append(self._with_newlines(t.reshape(ht * h2, wt * w2, D)))
        parts.append(self._with_newlines(global_feats.view(*global_hw, D)))
        parts.append(self.view_seperator.to(global_feats.dtype)[None])
        return torch.cat(parts, dim=0)  # (N_img, D)

    def image_embeddings(self, global_view: Tensor, tiles: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """Vectors for the <image> positions of one image: (N_img, D) (spec §3.5)."""
        return self.image_embeddings_batch([PageViews(global_view, tiles, grid)])[0]

    def image_embeddings_batch(
        self, pages: Sequence[PageViews | tuple[Any, ...]], max_batch: int | None = None
    ) -> list[Tensor]:
        """Encode several images at once: views of equal size (all tiles, all global views of a
        size) share SAM/CLIP batches of at most `max_batch`; returns one (N_img, D) per page."""
        pages = [PageViews(*cast("tuple[Tensor, Tensor | None, tuple[int, int]]", p)) for p in pages]
        views: list[Tensor] = []  # every view, (3, S, S)
        for p in pages:
            g = p.global_view.reshape(-1, *p.global_view.shape[-3:])  # (1, 3, S, S)
            if g.shape[0] != 1:
                raise ValueError(f"one global view per page expected, got {g.shape[0]}")
            views.append(g[0])
            if _has_tiles(p):
                assert p.tiles is not None  # _has_tiles checked it
                if p.tiles.shape[0] != p.grid[0] * p.grid[1]:
                    raise ValueError(f"{p.tiles.shape[0]} tiles do not fill grid {p.grid}")
                views.extend(p.tiles)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault(tuple(v.shape), []).append(i)
        feats: list[Tensor | None] = [None] * len(views)
        for idx in groups.values():
            step = max_batch or len(idx)
            for s in range(0, len(idx), step):
                chunk = idx[s : s + step]
                out = self.encode_views(torch.stack([views[i] for i in chunk]))  # (b, n, D)
                for i, f in zip(chunk, out):
                    feats[i] = f
        result, pos = [], 0
        for p in pages:
            g = feats[pos]
            assert g is not None  # every view was encoded above
            pos += 1
            tile_feats, tile_hw = None, (0, 0)
            if _has_tiles(p):
                assert p.tiles is not None  # _has_tiles checked it
                n = p.tiles.shape[0]
                tile_feats = torch.stack(cast("list[Tensor]", feats[pos : pos + n]))  # (T, h2*w2, D)
                tile_hw = self._hw(p.tiles)
                pos += n
            result.append(self.layout(g, self._hw(p.global_view), tile_feats, tile_hw, p.grid))
        return result

    def _hw(self, views: Tensor) -> tuple[int, int]:
        return views.shape[-2] // self.stride, views.shape[-1] // self.stride


def _has_tiles(p: PageViews) -> bool:
    return p.tiles is not None and p.tiles.shape[0] > 0 and tuple(p.grid) != (1, 1)
