"""Shared test helpers: the tolerance rule of DESIGN.md 5 (kept in elr_ext/testing.py, which the GPU
check uses too) and the backends to run."""

from __future__ import annotations

import elr_ext
from elr_ext.testing import assert_close_to_ref  # noqa: F401  (the tests import it from here)


def cpu_backends() -> list:
    """Every backend that runs on CPU tensors here (torch always; cpu when compiled; triton under
    TRITON_INTERPRET=1)."""
    return elr_ext.available_backends("cpu")
