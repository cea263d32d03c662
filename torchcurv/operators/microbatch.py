"""Splitting a batch into microbatches along dim 0, and refusing models where that is wrong.

A batch's loss is a weighted mean (or a sum) of per-example loss terms, so the curvature of
a batch equals the weighted sum of its microbatches' curvatures -- as long as the model
treats examples independently. Layers that mix examples within a batch (BatchNorm in train
mode uses the batch's statistics) make the microbatched operator a different matrix.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchcurv.data import batch_tensors, map_batch

Batch = Any


def check_microbatch_size(microbatch_size: int | None) -> None:
    """Accept ``None`` (no splitting) or a positive ``int``."""
    if microbatch_size is None:
        return
    if isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int):
        raise TypeError(
            f"microbatch_size must be a positive int or None, got {microbatch_size!r}"
        )
    if microbatch_size < 1:
        raise ValueError(f"microbatch_size must be >= 1, got {microbatch_size}")


def refuse_batch_coupling(model: nn.Module) -> None:
    """Raise if a module of ``model`` mixes the examples of a batch (BatchNorm in train mode)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"microbatch_size is set but module '{name or type(model).__name__}' "
                f"({type(module).__name__}) is in train mode: it normalises with the "
                "statistics of the batch it sees, so splitting a batch changes the model's "
                "function and the curvature. Call model.eval() or drop microbatch_size"
            )


def leading_size(batch: Batch) -> int:
    """The common dim-0 size of every tensor with ``ndim >= 1`` in a (nested) batch.

    Raises ``ValueError`` if the tensors disagree or there are none.
    """
    sizes = {t.shape[0] for t in batch_tensors(batch) if t.ndim >= 1}
    if len(sizes) != 1:
        raise ValueError(
            "microbatching splits every tensor of a batch along dim 0, but this batch's "
            + (f"tensors have leading sizes {sorted(sizes)}" if sizes else "has no tensor")
            + "; make dim 0 the example dimension of every tensor, or drop microbatch_size"
        )
    return sizes.pop()


def split_batch(batch: Batch, microbatch_size: int) -> list[Batch]:
    """Chunks of ``batch`` with at most ``microbatch_size`` examples each, as views.

    Every tensor with ``ndim >= 1`` is split along dim 0; 0-dim tensors and non-tensor
    leaves are shared by all chunks. Containers keep their type (tuple, list, namedtuple,
    dict, HuggingFace ``BatchEncoding``).
    """
    size = leading_size(batch)

    def chunk(start: int) -> Batch:
        return map_batch(lambda t: t[start:start + microbatch_size] if t.ndim >= 1 else t,
                         batch)

    return [chunk(start) for start in range(0, size, microbatch_size)]

