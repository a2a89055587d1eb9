"""Test fault injection for the OCR actors, parsed once from the environment (never set in
production; the integration tests set it to prove that a dying actor loses no finished work).

    PAGEMILL_TEST_OCR_FAULT=<where>:<marker file>   the first process to reach <where> ("ocr": actor
                                                    start, "ocr_call": a batch) creates the marker
                                                    and dies at once; later ones carry on
    PAGEMILL_TEST_OCR_POISON=<name>                 a batch holding a page of a document whose URI
                                                    contains <name> kills the process, every time

The renderer's own hook (`PAGEMILL_TEST_RENDER_FAULT`) lives with the renderer's child process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

FAULT_ENV = "PAGEMILL_TEST_OCR_FAULT"
POISON_ENV = "PAGEMILL_TEST_OCR_POISON"


@dataclass(frozen=True)
class OcrFaults:
    where: str = ""  # "" : no fault
    marker: str = ""
    poison: str = ""

    def die_once(self, where: str) -> None:
        """Die (a real process death) if this is the first process to reach `where`."""
        if not self.where or self.where != where:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)

    def poisoned(self, source_uris: Iterable[str | None]) -> None:
        """Die if one of the batch's documents is the poisoned one."""
        if self.poison and any(self.poison in (u or "") for u in source_uris):
            os._exit(1)


@lru_cache(maxsize=1)
def ocr_faults() -> OcrFaults:
    """The faults of this process (read once)."""
    spec = os.environ.get(FAULT_ENV, "")
    where, _, marker = spec.partition(":")
    return OcrFaults(where=where if marker else "", marker=marker, poison=os.environ.get(POISON_ENV, ""))
