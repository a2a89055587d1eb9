"""Grounding parser: real-shaped pages, box mapping, multi-box det, malformed/looping output (never raises)."""

from __future__ import annotations

import time

import pytest

from model.grounding import EOS, Block, ParsedPage, parse_det, parse_grounding

PAGE = (
    "<|ref|>title<|/ref|><|det|>[[118, 60, 880, 95]]<|/det|>\n# Attention Is All You Need\n\n"
    "<|ref|>text<|/ref|><|det|>[[118, 110, 880, 240]]<|/det|>\n"
    "The dominant models are based on RNNs. We define \\(f \\coloneqq g\\) and \\(h \\eqqcolon k\\).\n\n"
    "<|ref|>sub_title<|/ref|><|det|>[[118, 250, 500, 270]]<|/det|>\n## 1 Results\n\n"
    "<|ref|>table<|/ref|><|det|>[[118, 280, 880, 420]]<|/det|>\n"
    '<table><tr><td>Model</td><td colspan="2">BLEU</td></tr><tr><td>Ours</td><td>28.4</td><td></td></tr></table>\n\n'
    "<|ref|>image<|/ref|><|det|>[[200, 430, 800, 700]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[250, 705, 750, 725]]<|/det|>\n<center>Figure 1: The model.</center>\n\n"
    "<|ref|>equation<|/ref|><|det|>[[300, 740, 700, 780]]<|/det|>\n\\[\nE = mc^2\n\\]\n\n\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 800, 400, 990]]<|/det|>\n\n" + EOS
)


def parse(raw: str, **kw: object) -> ParsedPage:
    return parse_grounding(raw, (1224, 1584), (612.0, 792.0), **kw)  # type: ignore[arg-type]


def test_typical_page_blocks_and_markdown() -> None:
    p = parse(PAGE)
    assert p.eos and p.warnings == []
    labels = [b.label for b in p.blocks]
    assert labels == ["title", "text", "sub_title", "table", "image", "image_caption", "equation", "image"]
    assert p.blocks[0].text == "# Attention Is All You Need"
    assert p.blocks[3].text.startswith("<table><tr><td>Model</td>") and p.blocks[3].text.endswith("</table>")
    assert p.blocks[4].text == "" and p.blocks[4].figure_ref == "figures/4.png"
    assert p.blocks[7].figure_ref == "figures/7.png"
    md = p.markdown
    assert "<|" not in md and EOS not in md and "\n\n\n" not in md
    assert "\\(f := g\\)" in md and "\\(h =: k\\)" in md
    assert md.index("![](figures/4.png)") < md.index("<center>Figure 1") < md.index("E = mc^2")
    assert md.startswith("# Attention") and md.endswith("![](figures/7.png)")


def test_figure_ref_parameter() -> None:
    p = parse(PAGE, figure_ref="images/3_{k}.jpg")
    assert [b.figure_ref for b in p.blocks if b.label == "image"] == ["images/3_0.jpg", "images/3_1.jpg"]
    p = parse(PAGE, figure_ref=lambda i, k: f"p7/fig{k}-b{i}.png")
    assert "![](p7/fig1-b7.png)" in p.markdown


def test_box_mapping_pixels_and_points() -> None:
    raw = "<|ref|>text<|/ref|><|det|>[[0, 999, 999, 0]]<|/det|>\nx" + EOS
    (b,) = parse_grounding(raw, (1000, 2000), (500.0, 700.0)).blocks
    assert b.bbox_norm == (0, 0, 999, 999)  # ordered
    assert b.bbox_px == (0, 0, 1000, 2000)
    assert b.bbox_pt == pytest.approx((0.0, 0.0, 500.0, 700.0))
    raw = "<|ref|>text<|/ref|><|det|>[[100, 200, 500, 750]]<|/det|>\nx"
    (b,) = parse_grounding(raw, (1224, 1584), (612.0, 792.0)).blocks
    assert b.bbox_px == (
        int(100 / 999 * 1224),
        int(200 / 999 * 1584),
        int(500 / 999 * 1224),
        int(750 / 999 * 1584),
    )
    assert b.bbox_px == (122, 317, 612, 1189)
    assert b.bbox_pt == pytest.approx((100 / 999 * 612, 200 / 999 * 792, 500 / 999 * 612, 750 / 999 * 792))
    (b,) = parse_grounding(raw, (1224, 1584), None).blocks
    assert b.bbox_pt is None and b.bbox_px is not None


def test_multi_box_det() -> None:
    raw = "<|ref|>先天下之忧而忧<|/ref|><|det|>[[10, 20, 30, 40], [50, 60, 70, 80],[1,2,3,4]]<|/det|>" + EOS
    (b,) = parse(raw).blocks
    assert b.label == "先天下之忧而忧"
    assert b.boxes == ((10, 20, 30, 40), (50, 60, 70, 80), (1, 2, 3, 4))
    assert b.bbox_norm == (10, 20, 30, 40)


def test_parse_det_rejects_bad_lists_keeps_good() -> None:
    assert parse_det("[[1, 2, 3, 4]]") == ([(1, 2, 3, 4)], 0)
    assert parse_det("[[-5, 2000, 3, 4]]") == ([(0, 4, 3, 999)], 0)  # clamped then ordered
    assert parse_det("[[1, 2]]") == ([], 1)
    assert parse_det("[[1, 2, 3, 4, 5], [a, b, c, d], [5, 6, 7, 8]]") == ([(5, 6, 7, 8)], 2)
    assert parse_det("[[1.0, 2.7, 3, 4]]") == ([(1, 2, 3, 4)], 0)
    assert parse_det("[[" + "9" * 5000 + ", 1, 2, 3]]") == ([], 1)  # no 5000-digit int conversion
    assert parse_det("__import__('os').system('x')") == ([], 1)
    assert parse_det("[[１, ２, ３, ４]]") == ([], 1)  # full-width digits are not numbers here


@pytest.mark.parametrize(
    "raw",
    [
        "<|ref|>text<|/ref|><|det|>[[1, 2",
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]",
        "<|ref|>te",
        "<|ref|>",
        "<|/ref|><|/det|><|det|><|det|><|ref|><|ref|>",
        "<|ref|>text<|/ref|>no det here\n\nbody",
        "<|ref|>text<|/ref|><|det|>[[a, b, c, d]]<|/det|>\nbody",
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4, 5]]<|/det|>\nbody",
        "<|ref|>text<|/ref|><|det|>[[1, 2]]<|/det|>\nbody",
        "<|ref|>text<|/ref|><|det|>[[-1, -2, -3, -4]]<|/det|>\nbody",
        "<|ref|>text<|/ref|><|det|>[[[[[[[]]]]]]]<|/det|>\nbody",
        "<|ref|>image<|/ref|><|det|>[]<|/det|>",
        "\x00\ufffd<|ref|>ü<|/ref|><|det|>[[1,2,3,4]]<|/det|>𝔘𝔫𝔦 ✓ 中文",
        "<|det|>[[1,2,3,4]]<|/det|>orphan det",
        "<|ref|>text<|det|>[[1,2,3,4]]<|/det|>body",
        "<|ref|" + "|>" * 10,
        EOS + "after",
        "",
    ],
)
def test_malformed_never_raises(raw: str) -> None:
    p = parse(raw)
    assert isinstance(p.markdown, str) and "<|ref|>" not in p.markdown and "<|det|>" not in p.markdown
    for b in p.blocks:
        assert isinstance(b, Block)
        if b.bbox_norm is not None:
            assert all(0 <= v <= 999 for v in b.bbox_norm)
            assert b.bbox_norm[0] <= b.bbox_norm[2] and b.bbox_norm[1] <= b.bbox_norm[3]


def test_malformed_blocks_keep_text_and_warn() -> None:
    p = parse("<|ref|>text<|/ref|><|det|>[[a, b, c, d]]<|/det|>\nbody one\n\n<|ref|>title<|/ref|>no det")
    assert [(b.label, b.bbox_norm, b.text) for b in p.blocks] == [
        ("text", None, "body one"),
        ("title", None, "no det"),
    ]
    assert p.markdown == "body one\n\nno det" and len(p.warnings) == 2 and not p.eos
    p = parse("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nok\n\n<|ref|>text<|/ref|><|det|>[[1, 2")
    assert [(b.bbox_norm, b.text) for b in p.blocks] == [((1, 2, 3, 4), "ok"), (None, "")]
    assert p.warnings and "unterminated <|det|>" in p.warnings[0]
    p = parse("<|ref|>a long truncated paragraph that lost its closing tag\nand more")
    assert p.blocks[0].label == "unknown" and "and more" in p.blocks[0].text
    p = parse("<|ref|>image<|/ref|><|det|>[[1, 2]]<|/det|>\n\n")
    assert p.blocks[0].figure_ref is None and "![" not in p.markdown and p.warnings


def test_plain_output_and_eos_detection() -> None:
    p = parse("Hello world.\n\n\n\nSecond \\coloneqq para." + EOS)
    assert p.eos and p.warnings == []
    assert [(b.label, b.bbox_norm, b.text) for b in p.blocks] == [
        ("text", None, "Hello world.\n\nSecond := para.")
    ]
    assert p.markdown == "Hello world.\n\nSecond := para."
    p = parse("Hello world.")
    assert not p.eos and p.markdown == "Hello world."
    p = parse("")
    assert p.blocks == [] and p.markdown == "" and not p.eos
    p = parse(EOS)
    assert p.eos and p.blocks == []
    p = parse(PAGE[: -len(EOS)])
    assert not p.eos and len(p.blocks) == 8


def test_loops_are_linear_and_warnings_capped() -> None:
    unit = "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nOCR OCR\n\n"
    cases = [
        "<|ref|>" * 30_000,  # 210 KB of unbalanced opens
        "<|ref|>text<|/ref|><|det|>" + "[" * 200_000,
        "<|ref|>text<|/ref|><|det|>" + "[1, " * 50_000,
        "<|ref|>text<|/ref|><|det|>[" + "1, " * 66_000 + "<|/det|>",
        "<|ref|>text<|/ref|><|det|>[[" + "1," * 100_000 + "]]<|/det|>",
        unit * (200_000 // len(unit)),
        "<|ref|>" + "text " * 40_000,
        "OCR" * 70_000,
        ("<|det|>[[" + "<|ref|>" * 3) * 8_000,
    ]
    for raw in cases:
        t0 = time.perf_counter()
        p = parse(raw)
        # a catastrophe guard, not a speed target: a quadratic parse of ~200 KB takes hours, a
        # linear one milliseconds; 10 s leaves room for a loaded 2-core CI machine
        assert time.perf_counter() - t0 < 10.0, raw[:40]
        assert len(p.warnings) <= 51
    p = parse(unit * 4000)
    assert len(p.blocks) == 4000 and p.warnings == []
