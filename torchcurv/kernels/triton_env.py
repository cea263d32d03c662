"""Whether triton is installed and whether it runs in its CPU interpreter.

Kept apart from the kernels so that the dispatcher (:mod:`torchcurv.kernels.ce_hvp`) can
ask without importing triton, and the kernel module without importing the dispatcher.
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_active() -> bool:
    """Whether triton runs kernels in its CPU interpreter (it reads this at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
