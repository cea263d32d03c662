"""The one precision rule: which dtype sums, reductions and factorisations run in."""

from __future__ import annotations

import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes``, and at least float32.

    Batch products are summed, softmax statistics reduced and QR / eigh factorisations
    run in it, then rounded once to the caller's dtype: bfloat16 keeps 8 significand
    bits (float16 11), so a sum of about 100 terms already loses every one of them, and
    torch's QR / eigh have no 16-bit kernels. float64 anywhere in ``dtypes`` makes it
    float64.
    """
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result
