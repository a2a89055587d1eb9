"""Tokenizer wrapper and prompt assembly for DeepSeek-OCR.

What: ``OcrTokenizer`` loads a model directory's tokenizer files (``tokenizer.json`` +
``tokenizer_config.json``) through ``transformers.PreTrainedTokenizerFast``, as the model authors'
code does with ``AutoTokenizer`` (tests/model/test_tokenizer.py proves both give the same ids as the
raw ``tokenizers`` file on the parity fixtures), and builds the exact prompt id sequence of the
official scripts:

    [BOS=0] + tok(text before "<image>") + [128815] * N + tok(text after "<image>")

tokenised with ``add_special_tokens=False`` - no role tags, no EOS, no assistant prefix; BOS is
added here explicitly, as the reference does (so how a transformers version sets up the
post-processor never matters). The class is named, not guessed: ``AutoTokenizer`` maps the
checkpoint's ``LlamaTokenizer`` entry to another class in each transformers major version.

``OcrTokenizer.default()`` loads the copy bundled in ``model/assets/tokenizer`` (the DeepSeek-V3
BPE with the official DeepSeek-OCR added-token table; provenance in ``shared/parity/README.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import StrEnum

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS_ID = 0
EOS_ID = 1
PAD_ID = 2
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128815
REF_START_ID, REF_END_ID = 128816, 128817  # <|ref|> <|/ref|>
DET_START_ID, DET_END_ID = 128818, 128819  # <|det|> <|/det|>
GROUNDING_ID = 128820  # <|grounding|>
TD_START_ID, TD_END_ID = 128821, 128822  # <td> </td> (whitelisted from the n-gram ban)
TR_START_ID, TR_END_ID = 128823, 128824  # <tr> </tr>

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"


class PromptName(StrEnum):
    """The official prompts by name (`generation.prompt`)."""

    document = "document"  # the default: grounded markdown of a whole page
    ocr_image = "ocr_image"
    free_ocr = "free_ocr"
    figure = "figure"
    describe = "describe"


# Official prompt strings, verbatim: "\n" is a real newline, no trailing space. Keyed by the enum
# members, which are str: PROMPTS["document"] works too.
PROMPTS: dict[str, str] = {
    PromptName.document: "<image>\n<|grounding|>Convert the document to markdown.",
    PromptName.ocr_image: "<image>\n<|grounding|>OCR this image.",
    PromptName.free_ocr: "<image>\nFree OCR.",
    PromptName.figure: "<image>\nParse the figure.",
    PromptName.describe: "<image>\nDescribe this image in detail.",
}
DEFAULT_PROMPT = PROMPTS[PromptName.document]

# Token ids that must map to these exact strings in any tokenizer we accept.
_EXPECTED_SPECIALS = {
    BOS_ID: "<｜begin▁of▁sentence｜>",
    EOS_ID: "<｜end▁of▁sentence｜>",
    IMAGE_TOKEN_ID: IMAGE_TOKEN,
    GROUNDING_ID: "<|grounding|>",
    TD_START_ID: "<td>",
    TD_END_ID: "</td>",
}


class OcrTokenizer:
    """Encode/decode text and assemble prompt ids for one image."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        for tid, text in _EXPECTED_SPECIALS.items():
            if tokenizer.convert_ids_to_tokens(tid) != text:
                raise ValueError(
                    f"tokenizer id {tid} is {tokenizer.convert_ids_to_tokens(tid)!r}, expected {text!r}: "
                    "not a DeepSeek-OCR tokenizer"
                )
        self._tok = tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> OcrTokenizer:
        """Load a model directory's tokenizer files through transformers (``tokenizer.json``,
        with ``tokenizer_config.json`` and ``special_tokens_map.json`` when present), or one
        ``tokenizer.json`` given by its path."""
        from transformers import PreTrainedTokenizerFast

        p = Path(path)
        file = p if p.is_file() else p / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        if p.is_file():
            return cls(PreTrainedTokenizerFast(tokenizer_file=str(file)))
        return cls(PreTrainedTokenizerFast.from_pretrained(str(p)))

    @property
    def hf(self) -> PreTrainedTokenizerFast:
        """The transformers tokenizer underneath (what the model authors' code calls)."""
        return self._tok

    @classmethod
    def default(cls) -> OcrTokenizer:
        """The tokenizer bundled with pagemill (``model/assets/tokenizer``)."""
        return cls.from_dir(DEFAULT_TOKENIZER_DIR)

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def image_token_id(self) -> int:
        return IMAGE_TOKEN_ID

    def __len__(self) -> int:
        """Number of defined ids (base vocabulary + added tokens); the embedding has more rows."""
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with ``add_special_tokens=False`` (special-token strings still map)."""
        return list(self._tok.encode(text, add_special_tokens=False)) if text else []

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry; None if there is none (the tokenizer has no unk)."""
        tid = self._tok.convert_tokens_to_ids(token)
        return tid if isinstance(tid, int) else None

    def id_to_token(self, token_id: int) -> str | None:
        tok = self._tok.convert_ids_to_tokens(token_id)
        return tok if isinstance(tok, str) else None

    def build_prompt_ids(self, prompt: str, num_image_tokens: int, strip: bool = False) -> list[int]:
        """The official prompt ids (module docstring); ``prompt`` must contain ``<image>`` once.

        ``strip=True`` mimics the HF ``infer`` path (conversation template strips the prompt);
        the vLLM scripts pass it raw, which is the default here.
        """
        if strip:
            prompt = prompt.strip()
        n = prompt.count(IMAGE_TOKEN)
        if n != 1:
            raise ValueError(f"prompt must contain {IMAGE_TOKEN!r} exactly once, found {n}: {prompt!r}")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int):
            raise ValueError(f"num_image_tokens must be an int, got {num_image_tokens!r}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        before, after = prompt.split(IMAGE_TOKEN)
        image = [IMAGE_TOKEN_ID] * num_image_tokens
        return [BOS_ID, *self.encode(before), *image, *self.encode(after)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``; by default special tokens (``<|ref|>``, ``<td>``, EOS) are kept."""
        text = self._tok.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)  # one sequence in, one string out
        return text
