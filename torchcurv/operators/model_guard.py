"""Give the model back exactly as it was, whatever happens inside a product."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserved(model: nn.Module, params: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Restore train/eval flags, buffers, ``.grad`` and ``params`` on exit.

    Also on exceptions and ``KeyboardInterrupt``. ``params`` are the tensors a caller may
    perturb in place (finite differences); they are copied once and copied back, which
    is bit-exact. Buffers are restored the same way (BatchNorm running statistics).
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    values = [(p, p.detach().clone()) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in values:
                if not torch.equal(p, saved):
                    p.copy_(saved)
            for b, saved in buffers:
                if b.shape != saved.shape or not torch.equal(b, saved):
                    b.data = saved
        for m, training in modes:
            m.training = training
        for p, g in grads:
            if p.grad is not g:
                p.grad = g
