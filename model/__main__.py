"""OCR one page image from the command line: prints the markdown, then the layout blocks.

    python -m model page.png --model tiny_random --max-new-tokens 64
    python -m model page.png --source /models/DeepSeek-OCR --mode gundam

The same code path as a pipeline GPU actor (preprocess -> engine -> grounding parse), for one page.
"""

from __future__ import annotations

import argparse
import sys

from model.engine import EngineConfig
from model.preprocess import MODES, ImageError, load_image, preprocess_image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("image", help="page image file (PNG, JPEG, ...)")
    ap.add_argument("--model", default="deepseek_ocr", choices=["deepseek_ocr", "tiny_random"])
    ap.add_argument(
        "--source", default="deepseek-ai/DeepSeek-OCR", help="hub id or local checkpoint directory"
    )
    ap.add_argument("--mode", default="gundam", choices=sorted(MODES))
    # defaults from their one home: the mode table and the engine config
    ap.add_argument("--max-crops", type=int, default=None, help="default: the mode's (gundam: 6)")
    ap.add_argument("--max-new-tokens", type=int, default=EngineConfig.max_new_tokens)
    ap.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: per model)")
    args = ap.parse_args(argv)

    from model.grounding import parse_grounding
    from model.hub import CheckpointUnavailable
    from model.runner import OcrInput, PageOcr

    try:
        img = load_image(args.image)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prep = preprocess_image(img, args.mode, max_crops=args.max_crops)
    dtype = args.dtype or ("float32" if args.model == "tiny_random" else "bfloat16")
    try:
        ocr = PageOcr.load(args.model, args.source, dtype, max_batch=1, max_new_tokens=args.max_new_tokens)
    except CheckpointUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    (out,) = ocr.run([OcrInput(prep.global_view, prep.tiles, prep.grid, prep.num_image_tokens)])
    page = parse_grounding(out.raw_output, img.size)
    print(
        f"# {args.image}: {img.size[0]}x{img.size[1]} px, mode {args.mode}, grid {prep.grid}, "
        f"{out.num_vision_tokens} image tokens, {out.num_output_tokens} output tokens, "
        f"finish {out.finish_reason}, {out.ocr_ms:.0f} ms"
    )
    print("## markdown")
    print(page.markdown)
    print(f"## blocks ({len(page.blocks)})")
    for i, b in enumerate(page.blocks):
        print(f"{i:3d} {b.label:<14} box={b.bbox_norm} px={b.bbox_px} text={b.text[:60]!r}")
    for w in page.warnings[:5]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
