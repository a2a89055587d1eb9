"""Parse DeepSeek-OCR grounding output into typed blocks + clean markdown (spec §5; no torch).

Adapted from DeepSeek-OCR's `run_dpsk_ocr_pdf.py` post-processing.

Grammar (spec §5.1): ``<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>\\nCONTENT\\n\\n`` per
layout element; boxes are 0..999 relative to the original (un-padded) page image. Markdown follows the
official post-processing (spec §5.2): tags removed (content kept), ``image`` blocks become a figure
reference, ``\\coloneqq``->``:=``, ``\\eqqcolon``->``=:``, 3+ newlines -> 2, EOS stripped and reported.

Key decisions:
- Model text is untrusted and can be a degenerate loop: parsing NEVER raises and is linear. Tags are
  found with one literal-alternation regex (no ``.*?`` spans, so no quadratic rescans on unbalanced
  tags) and fed to a small state machine; malformed pieces keep their text, ``bbox_norm=None``, warning.
- ``<|det|>`` is read by a bracket/number scanner, NEVER ``eval``/``ast.literal_eval``: the official
  scripts ``eval()`` model output (code execution from a page image); ``literal_eval`` is safe from that
  but recurses on deeply nested brackets (a loop of ``[[[[`` raises RecursionError/MemoryError) and
  accepts arbitrarily long ints (Python refuses to convert ints of >4300 digits: ValueError).
- ``bbox_pt`` uses PyMuPDF's page space: origin top-left, y down (not PDF's bottom-left user space).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

EOS = "<｜end▁of▁sentence｜>"
BOS = "<｜begin▁of▁sentence｜>"
NORM = 999  # the models's coordinate scale; scripts map x_px = int(x / 999 * W) (issue #310)
MAX_LABEL = 32  # an unterminated "label" longer than this (or multi-line) is treated as text
MAX_WARNINGS = 50  # a looped page can produce thousands of identical warnings; keep the first ones

Box = tuple[int, int, int, int]
FigureRef = Callable[[int, int], str]  # (block index in page, image counter k) -> relative path

_TAG = re.compile(r"<\|(/?)(ref|det)\|>")
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")  # innermost [...]; negated class -> no backtracking
_NUMBER = re.compile(r"\s*(-?[0-9]{1,12})(?:\.[0-9]{0,12})?\s*")
_MANY_NL = re.compile(r"\n{3,}")


@dataclass
class Block:
    label: str
    bbox_norm: Box | None = None  # first box, clamped to 0..999 and ordered; None when malformed
    bbox_px: Box | None = None
    bbox_pt: tuple[float, float, float, float] | None = None
    text: str = ""
    boxes: tuple[Box, ...] = ()  # every valid box in <|det|> (Locate can emit several)
    figure_ref: str | None = None  # markdown reference of an `image` block (where to save its crop)


@dataclass
class ParsedPage:
    blocks: list[Block]
    markdown: str
    eos: bool  # False -> truncated or looping generation (spec §8, 10.10)
    warnings: list[str] = field(default_factory=list)


def default_figure_ref(block_index: int, k: int) -> str:
    """Stable relative name of the k-th figure on a page: ``figures/{block_index}.png``."""
    return f"figures/{block_index}.png"


def parse_det(det: str) -> tuple[list[Box], int]:
    """Scan ``[[x1, y1, x2, y2], ...]`` -> (valid clamped boxes, number of rejected lists)."""
    boxes: list[Box] = []
    bad = 0
    for m in _INNER_LIST.finditer(det):
        parts = m.group(1).split(",")
        nums = [_NUMBER.fullmatch(p) for p in parts]
        if len(parts) != 4 or not all(nums):
            bad += 1
            continue
        x1, y1, x2, y2 = (min(max(int(n.group(1)), 0), NORM) for n in nums if n)
        boxes.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    if not boxes and not bad:
        bad = 1  # no complete [...] at all, e.g. a truncated "[[1, 2"
    return boxes, bad


def norm_to_px(box: Box, image_size: tuple[int, int]) -> Box:
    w, h = image_size
    return (int(box[0] / NORM * w), int(box[1] / NORM * h), int(box[2] / NORM * w), int(box[3] / NORM * h))


def norm_to_pt(box: Box, page_size_pt: tuple[float, float]) -> tuple[float, float, float, float]:
    w, h = page_size_pt
    return (box[0] / NORM * w, box[1] / NORM * h, box[2] / NORM * w, box[3] / NORM * h)


class _Builder:
    """State machine over (tag | text) pieces; one pass, no backtracking."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, str | None, list[str]]] = []  # (label, det or None, content parts)
        self.warnings: list[str] = []
        self.n_warnings = 0
        self.state = "out"  # out | ref | after_ref | det
        self.label: list[str] = []
        self.det: list[str] = []
        self.preamble: list[str] = []

    def warn(self, msg: str) -> None:
        self.n_warnings += 1
        if self.n_warnings <= MAX_WARNINGS:
            self.warnings.append(msg)

    def open_block(self, label: str, det: str | None) -> None:
        self.blocks.append((label.strip(), det, []))

    def close_pending(self, why: str) -> None:
        """Finish a ref/det that was cut off by another tag or by the end of the text."""
        if self.state == "ref":
            self.warn(f"ref {len(self.blocks)}: unterminated <|ref|> ({why})")
            label = "".join(self.label)
            if len(label) <= MAX_LABEL and "\n" not in label:
                self.open_block(label, None)
            else:  # not a label but text that lost its closing tag: keep it as content
                self.open_block("unknown", None)
                self.blocks[-1][2].append(label)
        elif self.state == "after_ref":
            self.warn(f"ref {len(self.blocks) - 1}: <|ref|> without <|det|> ({why})")
        elif self.state == "det":
            self.warn(f"ref {len(self.blocks) - 1}: unterminated <|det|> ({why})")
            label, _, parts = self.blocks[-1]
            self.blocks[-1] = (label, None, parts)
        self.state = "out"

    def text(self, t: str) -> None:
        if self.state == "ref":
            self.label.append(t)
        elif self.state == "det":
            self.det.append(t)
        else:
            if self.state == "after_ref" and t.strip():
                self.close_pending("content follows the label")
            (self.blocks[-1][2] if self.blocks else self.preamble).append(t)

    def tag(self, closing: bool, name: str) -> None:
        s = self.state
        if not closing and name == "ref":
            self.close_pending("new <|ref|>")
            self.state, self.label = "ref", []
        elif closing and name == "ref" and s == "ref":
            self.open_block("".join(self.label), None)
            self.state = "after_ref"
        elif not closing and name == "det" and s in ("ref", "after_ref", "out"):
            if s == "ref":
                self.warn(f"ref {len(self.blocks)}: <|det|> inside an unterminated <|ref|>")
                self.open_block("".join(self.label), None)
            elif s == "out":
                self.warn(f"ref {len(self.blocks)}: <|det|> without <|ref|>; label 'unknown'")
                self.open_block("unknown", None)
            self.state, self.det = "det", []
        elif closing and name == "det" and s == "det":
            label, _, parts = self.blocks[-1]
            self.blocks[-1] = (label, "".join(self.det), parts)
            self.state = "out"
        else:
            slash = "/" if closing else ""
            self.warn(f"stray <|{slash}{name}|> ignored (after {len(self.blocks)} refs)")


def _clean(md: str) -> str:
    """Official clean-up: LaTeX colon-equals macros, then 3+ newlines -> 2; trim blank edges."""
    md = md.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    return _MANY_NL.sub("\n\n", md).strip("\n").rstrip()


def parse_grounding(
    raw: str,
    image_size: tuple[int, int],
    page_size_pt: tuple[float, float] | None = None,
    figure_ref: FigureRef | str = default_figure_ref,
) -> ParsedPage:
    """Raw decoded output (special tokens kept) -> blocks, markdown, eos flag, warnings. Never raises.

    ``image_size`` = (W, H) of the page image the model saw (before its own resize/pad);
    ``figure_ref`` = callable ``(block_index, k) -> str`` or a format string with ``{block}``/``{k}``.
    """
    if not isinstance(raw, str):
        raw = "" if raw is None else str(raw)
    b = _Builder()
    cut = raw.find(EOS)
    eos = cut >= 0
    if eos:
        if raw[cut + len(EOS) :].replace(EOS, "").strip():
            b.warn("text after EOS dropped")
        raw = raw[:cut]
    raw = raw.replace(BOS, "")

    pos = 0
    for m in _TAG.finditer(raw):
        if m.start() > pos:
            b.text(raw[pos : m.start()])
        b.tag(m.group(1) == "/", m.group(2))
        pos = m.end()
    if pos < len(raw):
        b.text(raw[pos:])
    b.close_pending("end of output")

    blocks: list[Block] = []
    pre = _clean("".join(b.preamble))
    if pre.strip():
        if b.blocks:
            b.warn("text before the first <|ref|> kept as a 'text' block")
        blocks.append(Block(label="text", text=pre))
    for label, det, parts in b.blocks:
        blk = Block(label=label, text=_clean("".join(parts)))
        if det is not None:
            boxes, bad = parse_det(det)
            if bad:
                b.warn(f"block {len(blocks)} ({label!r}): {bad} malformed box(es) in <|det|>{det[:40]!r}")
            if boxes:
                blk.boxes, blk.bbox_norm = tuple(boxes), boxes[0]
                blk.bbox_px = norm_to_px(boxes[0], image_size)
                if page_size_pt is not None:
                    blk.bbox_pt = norm_to_pt(boxes[0], page_size_pt)
        blocks.append(blk)

    parts_md: list[str] = []
    k = 0
    for i, blk in enumerate(blocks):
        if blk.label == "image":
            if blk.bbox_norm is None:
                b.warn(f"block {i}: image without a valid box; no figure reference")
            else:
                ref = figure_ref(i, k) if callable(figure_ref) else figure_ref.format(block=i, k=k)
                blk.figure_ref, k = ref, k + 1
                parts_md.append(f"![]({ref})")
        if blk.text.strip():
            parts_md.append(blk.text)
    if b.n_warnings > MAX_WARNINGS:
        b.warnings.append(f"... {b.n_warnings - MAX_WARNINGS} more warnings")
    markdown = "\n\n".join(parts_md)  # parts are already clean and trimmed
    return ParsedPage(blocks=blocks, markdown=markdown, eos=eos, warnings=b.warnings)
