"""OCR one page image from the command line: prints the markdown, then the layout blocks.

    python -m model page.png --model tiny_random --max-new-tokens 64
    python -m model page.png --source /models/DeepSeek-OCR --mode gundam

The same code path as a pipeline GPU actor (preprocess -> engine -> grounding parse), for one page.
"""

from __future__ import annotations

import argparse
import sys

from model.config import DType, ModelName
from model.engine_config import EngineConfig
from model.hub import OFFICIAL_HUB_ID
from model.modes import DEFAULT_MODE, MODES, ModeName
from model.preprocess import ImageError, load_image, preprocess_image
from model.tokenizer import PromptName


def build_parser() -> argparse.ArgumentParser:
    """The command line; every choice and default comes from its one home on the model side (the
    name enums, the mode table, the hub id, the engine config)."""
    ap = argparse.ArgumentParser(prog="python -m model", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("image", help="page image file (PNG, JPEG, ...)")
    ap.add_argument("--model", default=ModelName.deepseek_ocr, choices=ModelName.values())
    ap.add_argument("--source", default=OFFICIAL_HUB_ID, help="hub id or local checkpoint directory")
    ap.add_argument("--mode", default=DEFAULT_MODE, choices=ModeName.values())
    ap.add_argument(
        "--max-crops",
        type=int,
        default=None,
        help=f"default: the mode's ({DEFAULT_MODE}: {MODES[DEFAULT_MODE].max_crops})",
    )
    ap.add_argument("--max-new-tokens", type=int, default=EngineConfig.max_new_tokens)
    ap.add_argument(
        "--dtype",
        default=None,
        choices=DType.values(),
        help=f"default: per model ({ModelName.tiny_random}: {ModelName.tiny_random.default_dtype}, "
        f"else {ModelName.deepseek_ocr.default_dtype})",
    )
    ap.add_argument("--prompt", default=PromptName.document, choices=PromptName.values())
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from model.grounding import parse_grounding
    from model.hub import CheckpointUnavailable
    from model.runner import OcrInput, PageOcr

    try:
        img = load_image(args.image)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prep = preprocess_image(img, args.mode, max_crops=args.max_crops)
    name = ModelName(args.model)
    dtype = args.dtype or name.default_dtype
    try:
        ocr = PageOcr.load(
            name, args.source, dtype, prompt=args.prompt, max_batch=1, max_new_tokens=args.max_new_tokens
        )
    except CheckpointUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    (out,) = ocr.run([OcrInput.from_views(prep)])
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
