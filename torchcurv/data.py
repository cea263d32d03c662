"""Walking a data set: re-iterability, device placement, fingerprints."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
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


def map_batch(
    fn: Callable[[torch.Tensor], Any],
    batch: Batch,
    *,
    leaf: Callable[[Any], Any] | None = None,
    rebuild: bool = True,
) -> Any:
    """The one walk over a nested batch: ``fn`` on every tensor, ``leaf`` on every other
    leaf (kept as it is when ``None``).

    Containers are tuples (namedtuples too), lists and every ``Mapping`` (dicts, HF
    ``BatchEncoding``); anything else is a leaf. With ``rebuild`` the containers keep
    their type (a mapping is rebuilt from a plain dict, which dict subclasses and
    ``BatchEncoding`` take), so device placement, microbatch slicing and the checks of
    :class:`~torchcurv.operators.curvature.CurvatureOperator` agree on what a batch
    holds. Without ``rebuild`` every container becomes a plain tuple (a mapping's items
    sorted by key): a summary that compares equal between two passes over the data.
    """

    def walk(b: Any) -> Any:
        if isinstance(b, torch.Tensor):
            return fn(b)
        if isinstance(b, (tuple, list)):
            items = [walk(x) for x in b]
            if not rebuild:
                return tuple(items)
            if isinstance(b, tuple) and hasattr(b, "_fields"):  # namedtuple
                return type(b)(*items)
            return type(b)(items)
        if isinstance(b, Mapping):
            if not rebuild:
                return tuple((k, walk(v)) for k, v in sorted(b.items(), key=lambda kv: kv[0]))
            rebuilt: Callable[[dict], Any] = type(b)  # Mapping itself has no constructor
            return rebuilt({k: walk(v) for k, v in b.items()})
        return b if leaf is None else leaf(b)

    return walk(batch)


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a (nested) batch, in the order :func:`map_batch` visits them."""
    found: list[torch.Tensor] = []
    map_batch(found.append, batch, rebuild=False)
    return found


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a (nested tuple/list/mapping) batch to ``device``."""
    # a tensor already there is kept as it is, without dispatching a no-op .to per
    # tensor per batch (products walk the data once per product)
    return map_batch(lambda t: t if t.device == device else t.to(device, non_blocking=True),
                     batch)


def iterate(data: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Yield the batches of ``data`` on ``device``."""
    for batch in data:
        yield to_device(batch, device)


def fingerprint(batch: Batch) -> Any:
    """A cheap summary of a batch's tensors, to tell whether two passes agree."""
    return map_batch(_tensor_fingerprint, batch, leaf=lambda x: (repr(x),), rebuild=False)


def _tensor_fingerprint(batch: torch.Tensor) -> tuple:
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


def shapes(batch: Batch) -> Any:
    """The shapes of a batch's tensors, nested like the batch: known without a kernel."""
    return map_batch(lambda t: tuple(t.shape), batch, leaf=lambda _: (), rebuild=False)


def placed(batch: Batch, device: torch.device) -> tuple[Batch, Any]:
    """``(to_device(batch, device), shapes(batch))``, in one pass without closures for the
    usual batches (a tuple or list of tensors, a plain dict of them), which every
    product walks once per batch."""
    # plain loops: a generator expression or comprehension is a frame of its own
    kind = type(batch)
    if kind is tuple or kind is list:
        layout = []
        here = True
        for t in batch:
            if type(t) is not torch.Tensor:
                break
            layout.append(tuple(t.shape))
            if here and t.device != device:
                here = False
        else:
            if here:
                return (batch if kind is tuple else list(batch)), tuple(layout)
            moved = [t if t.device == device else t.to(device, non_blocking=True)
                     for t in batch]
            return (tuple(moved) if kind is tuple else moved), tuple(layout)
    elif kind is dict:
        placed_items = {}
        for k, t in batch.items():
            if type(t) is not torch.Tensor:
                break
            placed_items[k] = t if t.device == device else t.to(device, non_blocking=True)
        else:
            return placed_items, tuple([(k, tuple(batch[k].shape)) for k in sorted(batch)])
    moved = to_device(batch, device)
    return moved, shapes(moved)
