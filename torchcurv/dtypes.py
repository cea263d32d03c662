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
        # torch.promote_types is a dispatched operation: only the wider dtypes need it
        if dtype not in _NOT_WIDER:
            result = torch.promote_types(result, dtype)
    return result


_NOT_WIDER = (torch.float32, torch.float16, torch.bfloat16)


def device_scalar(value: torch.Tensor | float, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``value`` as a 0-dim tensor of ``dtype`` on ``device``, made there: a Python number
    becomes a fill on the device rather than a host tensor copied over, which a CUDA
    graph being recorded refuses (and which costs a transfer per call)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype, device=device)
    return torch.full((), value, dtype=dtype, device=device)
