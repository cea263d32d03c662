"""Walking a data set: re-iterability, device placement, fingerprints."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

Batch = Any


def check_reiterable(data: Iterable[Batch]) -> None:
    """Refuse one-shot iterators: every product walks the data again."""
    if iter(data) is data:
        raise TypeError(
            "data is a one-shot iterator (a generator?); curvature products walk the data "
            "once per product, so pass a list of batches or a DataLoader"
        )


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a (nested tuple/list/dict) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    if hasattr(batch, "to") and hasattr(batch, "keys"):  # HF BatchEncoding
        return batch.to(device)
    return batch


def iterate(data: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Yield the batches of ``data`` on ``device``."""
    for batch in data:
        yield to_device(batch, device)


def fingerprint(batch: Batch) -> tuple:
    """A cheap summary of a batch's tensors, to tell whether two passes agree."""
    if isinstance(batch, torch.Tensor):
        t = batch.detach()
        if t.is_floating_point() or t.is_complex():
            t = t.double()
        else:
            t = t.long()
        flat = t.reshape(-1)
        ramp = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        # repr: a NaN in the data must compare equal to itself on the second pass.
        return (tuple(batch.shape), str(batch.dtype), repr(float(flat.sum())),
                repr(float((flat.double() * ramp).sum())))
    if isinstance(batch, (tuple, list)):
        return tuple(fingerprint(b) for b in batch)
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "items")):
        return tuple((k, fingerprint(v)) for k, v in sorted(batch.items()))
    return (repr(batch),)


def shapes(batch: Batch) -> tuple:
    """The shapes of a batch's tensors, nested like the batch: known without a kernel."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape)
    if isinstance(batch, (tuple, list)):
        return tuple(shapes(b) for b in batch)
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "items")):
        return tuple((k, shapes(v)) for k, v in sorted(batch.items()))
    return ()
