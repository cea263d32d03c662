"""Give the model back exactly as it was, whatever happens inside a product."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
    """
    modules = list(model.modules())
    attributes = [(m, dict(m.__dict__), {r: dict(getattr(m, r)) for r in _REGISTRIES
                                         if isinstance(m.__dict__.get(r), dict)})
                  for m in modules]
    tensors = {id(t): (t, t.detach().clone()) for m in modules
               for t in _held_tensors(m) if not isinstance(t, nn.Parameter)}
    grads = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    values = [(p, p.detach().clone()) for p in params]
    try:
        yield
    finally:
        for m, saved, registries in attributes:
            _restore_attributes(m, saved, registries)
        with torch.no_grad():
            for p, value in values:
                if not torch.equal(p, value):
                    p.copy_(value)
            for t, value in tensors.values():
                if t.shape != value.shape or t.dtype != value.dtype or not torch.equal(t, value):
                    t.data = value
        for p, g, requires_grad in grads:
            if p.grad is not g:
                p.grad = g
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)


def _held_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors a module holds directly: its buffers and plain tensor attributes."""
    for b in module._buffers.values():
        if b is not None:
            yield b
    for value in module.__dict__.values():
        if isinstance(value, torch.Tensor):
            yield value


def _restore_attributes(module: nn.Module, saved: dict, registries: dict[str, dict]) -> None:
    for name, entries in registries.items():
        registry = saved[name]  # the registry object itself, put back below if rebound
        if list(registry) != list(entries) or any(
                registry[k] is not v for k, v in entries.items()):
            registry.clear()
            registry.update(entries)
    current = module.__dict__
    for name in [k for k in current if k not in saved]:
        del current[name]
    for name, value in saved.items():
        if current.get(name, _MISSING) is not value:
            current[name] = value


_MISSING = object()
