"""Test fault injection, parsed once per process from the environment (never set in production;
the tests set it to prove that a dying actor or renderer loses no finished work).

    PAGEMILL_TEST_OCR_FAULT=<where>:<marker file>   the first process to reach <where> ("ocr": actor
                                                    start, "ocr_call": a batch) creates the marker
                                                    and dies at once; later ones carry on
    PAGEMILL_TEST_OCR_POISON=<name>                 a batch holding a page of a document whose URI
                                                    contains <name> kills the process, every time
    PAGEMILL_TEST_RENDER_FAULT=<kind>[:<arg>]       the renderer child (pipeline.render_proc), counted
                                                    from the first page of a render request:
                                                    hang:N / crash:N hang an hour / SIGSEGV before
                                                    page N; sleep:S sleeps S s before every page;
                                                    crashall SIGSEGVs before every page

The render fault is read in the parent (`render_fault()`) and sent with each request: the renderer
child is forked from a fork server that does not see later environment changes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

FAULT_ENV = "PAGEMILL_TEST_OCR_FAULT"
POISON_ENV = "PAGEMILL_TEST_OCR_POISON"
RENDER_FAULT_ENV = "PAGEMILL_TEST_RENDER_FAULT"
_RENDER_KINDS = ("hang", "crash", "sleep", "crashall")


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


@dataclass(frozen=True)
class RenderFault:
    """One renderer fault (see the module docstring); `kind` "" is no fault."""

    kind: str = ""
    arg: float = 0.0  # hang/crash: the page counted from the request's first; sleep: seconds

    @classmethod
    def parse(cls, spec: str) -> RenderFault:
        """`RenderFault` of a `PAGEMILL_TEST_RENDER_FAULT` value; a malformed one raises ValueError
        (a typo must not silently run the test without its fault)."""
        if not spec:
            return cls()
        kind, _, arg = spec.partition(":")
        try:
            value = float(arg) if arg else 0.0
        except ValueError:
            value = -1.0
        if kind not in _RENDER_KINDS or value < 0 or (kind in ("hang", "crash") and value != int(value)):
            raise ValueError(f"{RENDER_FAULT_ENV}={spec!r}: expected hang:N, crash:N, sleep:S or crashall")
        return cls(kind, value)

    def __bool__(self) -> bool:
        return bool(self.kind)

    def before_page(self, done: int) -> None:
        """Run in the renderer child before rendering the request's page number `done` (0-based)."""
        if self.kind == "sleep":
            time.sleep(self.arg)
        elif self.kind == "crashall" or (self.kind == "crash" and done == self.arg):
            os.kill(os.getpid(), signal.SIGSEGV)
        elif self.kind == "hang" and done == self.arg:
            time.sleep(3600)

    def after(self, consumed: int) -> RenderFault:
        """The fault for a retry that starts `consumed` pages into the request: a fresh child
        counts from 0, so hang/crash N is re-based, and dropped once its page has gone by."""
        if self.kind not in ("hang", "crash"):
            return self
        n = self.arg - consumed
        return RenderFault(self.kind, n) if n >= 0 else RenderFault()


@lru_cache(maxsize=1)
def render_fault() -> RenderFault:
    """The renderer fault of this process (read once)."""
    return RenderFault.parse(os.environ.get(RENDER_FAULT_ENV, ""))
