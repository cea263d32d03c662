"""Give the model back exactly as it was, whatever happens inside a product."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from itertools import chain, compress
from operator import attrgetter, is_, methodcaller
from typing import Any

import torch
from torch import nn

# Module dicts that register sub-objects; mutated in place by `register_*` and assignment.
_REGISTRIES = ("_parameters", "_buffers", "_modules")


def preserved(model: nn.Module, params: Sequence[torch.Tensor] = (),
              guard: ModelGuard | None = None) -> AbstractContextManager[None]:
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
    the snapshot is shallow dict copies, and the usual exit (nothing rebound) is a few
    identity comparisons over all attributes at once at C speed (``map(operator.is_,
    ...)``). ``guard``, a :class:`ModelGuard` of ``model``, reuses the layout of the
    model it saw last when the model still has it, instead of walking the modules again.
    A context manager object rather than a generator's, which costs several times as much.
    """
    return _Preserved(guard or ModelGuard(model), params)


class _Preserved:
    """The block of :func:`preserved`: the snapshot (the model's layout, its tensor values,
    ``.grad`` and ``requires_grad``) is taken on entry and put back on exit."""

    __slots__ = ("grads", "guard", "layout", "params", "requires_grad", "tensors", "values")

    def __init__(self, guard: ModelGuard, params: Sequence[torch.Tensor]) -> None:
        self.guard = guard
        self.params = params

    def __enter__(self) -> None:
        guard = self.guard
        layout = guard._layout
        if layout is None or not layout.current():
            layout = guard._layout = _Layout.of(guard.model)
        self.layout = layout
        self.tensors = ([(t, t.detach().clone()) for t in layout.tensors] if layout.tensors
                        else [])
        self.grads = list(map(_GRAD, layout.params))
        self.requires_grad = list(map(_REQUIRES_GRAD, layout.params))
        self.values = [(p, p.detach().clone()) for p in self.params] if self.params else []

    def __exit__(self, *exc: object) -> None:
        layout = self.layout
        if not layout.unchanged():
            layout.restore()
        if self.tensors:
            with torch.no_grad():
                for (t, value), changed in zip(self.tensors, _changed(self.tensors)):
                    if changed:
                        t.data = value
        params = layout.params
        if not all(map(is_, map(_GRAD, params), self.grads)):
            for p, g in zip(params, self.grads):
                if p.grad is not g:
                    p.grad = g
        if list(map(_REQUIRES_GRAD, params)) != self.requires_grad:
            for p, requires_grad in zip(params, self.requires_grad):
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
        if self.values:
            with torch.no_grad():
                # copied back only where changed: an in-place copy bumps the version
                # counter, which would break the caller's graphs holding the tensor
                for (t, value), changed in zip(self.values, _changed(self.values)):
                    if changed:
                        t.copy_(value)


def _changed(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """For each ``(tensor, snapshot)``: whether the tensor no longer equals its snapshot
    (as ``not torch.equal``: other shape or dtype, other values, or a NaN).

    The value comparisons are read back once per device, not once per tensor: on a GPU
    each read waits for the device, and a model with normalisation layers holds a few
    buffers per layer.
    """
    changed = [t.shape != v.shape or t.dtype != v.dtype or t.device != v.device
               for t, v in pairs]
    by_device: dict[torch.device, list[int]] = {}
    for i, (t, _) in enumerate(pairs):
        if not changed[i]:
            by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        if len(indices) == 1:
            i = indices[0]
            changed[i] = not torch.equal(*pairs[i])
            continue
        # ne, not a bitwise compare: a NaN differs from itself, as in torch.equal
        flags = torch.stack([torch.ne(*pairs[i]).any() for i in indices]).tolist()
        for i, flag in zip(indices, flags):
            changed[i] = flag
    return changed


class ModelGuard:
    """One model's guard for :func:`preserved`, which keeps the model's last layout.

    A layout (the modules, their attribute dicts and registries, the tensors among the
    attributes, the parameters) is immutable once made: products in several threads,
    or nested ones, share it, and one that finds the model changed makes a new one and
    puts it in place of the old. Until the next product it keeps the objects the model
    held at the last one alive (a submodule the caller has since removed, say).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layout: _Layout | None = None


class _Layout:
    """Every module attribute dict of a model and its registries, with what they held.

    The dicts are held in one list and their entries in flat lists, so that checking
    that nothing was rebound is a handful of C-level passes (``map``, ``chain``) over the
    whole model instead of Python calls per module and per attribute; only a model that
    did change is walked dict by dict.
    """

    __slots__ = ("copies", "dicts", "keys", "lengths", "modules", "params", "tensors",
                 "types", "values", "views", "watched")

    modules: list[nn.Module]
    types: list[type]
    dicts: int  # watched[:dicts] are the modules' __dict__, the rest their registries
    watched: list[dict]
    views: list[Any]  # the watched dicts' live values() views, made once
    copies: list[dict]
    lengths: list[int]
    keys: list[Any]
    values: list[Any]
    tensors: list[torch.Tensor]
    params: list[nn.Parameter]

    @classmethod
    def of(cls, model: nn.Module) -> _Layout:
        self = cls()
        modules = list(model.modules())
        dicts = [m.__dict__ for m in modules]
        registries = [r for d in dicts for name in _REGISTRIES
                      if type(r := d.get(name)) is dict]
        self.modules = modules
        self.types = list(map(type, modules))
        self.dicts = len(dicts)
        self.watched = watched = dicts + registries
        self.copies = list(map(dict.copy, watched))
        self.lengths = list(map(len, watched))
        self.keys = list(chain.from_iterable(watched))
        self.views = list(map(dict.values, watched))
        self.values = list(chain.from_iterable(self.views))
        # the plain tensors (not parameters) among the attributes and buffers
        buffers = [d["_buffers"] for d in dicts if "_buffers" in d]
        candidates = list(chain(chain.from_iterable(map(_values, buffers)),
                                self.values[:sum(self.lengths[:len(dicts)])]))
        kinds = list(map(_TENSOR_TYPES.get, map(type, candidates)))
        if None in kinds:
            kinds = [_tensor_type(type(t)) if k is None else k
                     for t, k in zip(candidates, kinds)]
        tensors: dict[int, torch.Tensor] = {}
        for t in compress(candidates, kinds):
            if not isinstance(t, nn.Parameter):
                tensors.setdefault(id(t), t)
        self.tensors = list(tensors.values())
        # a parameter of several modules comes once per module: restoring it twice to
        # the same state is harmless
        self.params = [p for p in chain.from_iterable(
            _values(d["_parameters"]) for d in dicts if "_parameters" in d) if p is not None]
        return self

    def current(self) -> bool:
        """Whether the model is as this layout found it: the same modules (of the same
        classes, with the same attribute dicts), each dict holding the same objects
        under the same names in the same order, so that a new layout would equal it."""
        modules, watched = self.modules, self.watched
        return (all(map(is_, map(type, modules), self.types))
                and all(map(is_, map(_DICT, modules), watched))
                # unchanged(), inline: once per product
                and list(map(len, watched)) == self.lengths
                and all(map(is_, chain.from_iterable(self.views), self.values))
                and list(chain.from_iterable(watched)) == self.keys)

    def unchanged(self) -> bool:
        """Whether every watched dict holds the same objects under the same names, in
        order (the usual case: nothing was rebound)."""
        watched = self.watched
        return (list(map(len, watched)) == self.lengths
                and all(map(is_, chain.from_iterable(self.views), self.values))
                # keys are names: equal strings name the same attribute
                and list(chain.from_iterable(watched)) == self.keys)

    def restore(self) -> None:
        """Put back what every watched dict held (a registry wholly, in its order)."""
        for j, (current, saved) in enumerate(zip(self.watched, self.copies)):
            if _same(current, saved):
                continue
            if j >= self.dicts:
                current.clear()
                current.update(saved)
                continue
            for name in [k for k in current if k not in saved]:
                del current[name]
            for name, value in saved.items():
                if current.get(name, _MISSING) is not value:
                    current[name] = value


def _same(current: dict, saved: dict) -> bool:
    """Whether ``current`` holds exactly ``saved``'s objects under the same names, in
    order (the usual case: nothing was rebound)."""
    return (len(current) == len(saved) and all(map(is_, current.values(), saved.values()))
            and current.keys() == saved.keys())


_MISSING = object()
_DICT = attrgetter("__dict__")
_GRAD = attrgetter("grad")
_REQUIRES_GRAD = attrgetter("requires_grad")
_values = methodcaller("values")

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
