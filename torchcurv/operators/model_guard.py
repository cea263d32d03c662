"""Give the model back exactly as it was, whatever happens inside a product."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import is_

import torch
from torch import nn

# Module dicts that register sub-objects; mutated in place by `register_*` and assignment.
_REGISTRIES = ("_parameters", "_buffers", "_modules")


@contextmanager
def preserved(model: nn.Module, params: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Restore the model on exit, bit for bit: modes, buffers, ``.grad``, ``params`` and
    the module attributes that hold them.

    Also on exceptions and ``KeyboardInterrupt`` (any ``BaseException``). ``params`` are
    the tensors a caller may perturb in place (finite differences); they are copied once
    and copied back, which is bit-exact. Buffer values and plain tensor attributes are
    restored the same way (BatchNorm running statistics, a step counter updated in
    place). Every module's attributes are restored as objects too: a ``forward`` that
    rebinds a buffer (``self.steps = self.steps + 1``), registers a new one, or sets any
    other attribute leaves the module as it found it. Parameters keep their identity
    and ``requires_grad``.

    Every product runs inside it, so it is written to cost little next to a gradient:
    the snapshot is shallow dict copies, and the usual exit (nothing rebound) is one
    identity comparison per attribute at C speed (``map(operator.is_, ...)``).
    """
    modules = _Snapshot.of(model)
    values = [(p, p.detach().clone()) for p in params]
    try:
        yield
    finally:
        modules.restore()
        if values:
            with torch.no_grad():
                for p, value in values:
                    if not torch.equal(p, value):
                        p.copy_(value)


class _Snapshot:
    """The module attributes, tensor values and parameter ``.grad`` / ``requires_grad``
    of a model at one moment, and how to put them back."""

    __slots__ = ("attributes", "grads", "tensors")
    attributes: list[tuple[dict, dict, list[tuple[str, dict, dict]]]]
    tensors: list[tuple[torch.Tensor, torch.Tensor]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None, bool]]

    @classmethod
    def of(cls, model: nn.Module) -> _Snapshot:
        self = cls()
        attributes = []
        tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        parameters: dict[int, nn.Parameter] = {}
        for m in model.modules():
            d = m.__dict__
            registries = [(r, d[r], d[r].copy()) for r in _REGISTRIES if type(d.get(r)) is dict]
            attributes.append((d, d.copy(), registries))
            for t in (*d["_buffers"].values(), *d.values()) if "_buffers" in d else d.values():
                is_tensor = _TENSOR_TYPES.get(type(t))
                if is_tensor is None:
                    is_tensor = _tensor_type(type(t))
                if is_tensor and not isinstance(t, nn.Parameter):
                    tensors.setdefault(id(t), (t, t.detach().clone()))
            for p in d.get("_parameters", {}).values():
                if p is not None:
                    parameters[id(p)] = p
        self.attributes = attributes
        self.tensors = list(tensors.values())
        self.grads = [(p, p.grad, p.requires_grad) for p in parameters.values()]
        return self

    def restore(self) -> None:
        for current, saved, registries in self.attributes:
            for _, registry, entries in registries:
                if not _same(registry, entries):
                    registry.clear()
                    registry.update(entries)
            if not _same(current, saved):
                for name in [k for k in current if k not in saved]:
                    del current[name]
                for name, value in saved.items():
                    if current.get(name, _MISSING) is not value:
                        current[name] = value
        if self.tensors:
            with torch.no_grad():
                for t, value in self.tensors:
                    if (t.shape != value.shape or t.dtype != value.dtype
                            or not torch.equal(t, value)):
                        t.data = value
        for p, g, requires_grad in self.grads:
            if p.grad is not g:
                p.grad = g
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)


def _same(current: dict, saved: dict) -> bool:
    """Whether ``current`` holds exactly ``saved``'s objects under the same names, in
    order (the usual case: nothing was rebound)."""
    return (len(current) == len(saved) and all(map(is_, current.values(), saved.values()))
            and current.keys() == saved.keys())


_MISSING = object()

# Per type, not per value: most attribute values are not tensors, and isinstance against
# torch.Tensor (whose metaclass is not `type`) takes the slow path for every one of them,
# the largest part of a snapshot of a module with many attributes. A plain dict (an
# lru_cache's call costs more than the check saves), emptied when it grows large, as
# classes made on the fly would otherwise be kept alive.
_TENSOR_TYPES: dict[type, bool] = {}
_TENSOR_TYPES_LIMIT = 4096


def _tensor_type(cls: type) -> bool:
    if len(_TENSOR_TYPES) >= _TENSOR_TYPES_LIMIT:
        _TENSOR_TYPES.clear()
    is_tensor = _TENSOR_TYPES[cls] = issubclass(cls, torch.Tensor)
    return is_tensor
