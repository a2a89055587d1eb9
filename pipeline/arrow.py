"""`pyarrow.compute` typed as `Any`, the one place that says so: its kernels are generated when it
is imported, so pyright sees none of them (pyarrow ships no stubs) and would want an ignore on
every call."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as _pc  # pyright: ignore[reportMissingTypeStubs]

pc: Any = _pc
