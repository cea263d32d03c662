"""One all-reduce per curvature product, carrying the failure flags along with the data.

Each rank holds a shard of the data; a product is the sum of the per-rank products. The
flattened product travels in one buffer together with two counters -- batches whose loss
was not finite, and ranks whose local computation raised -- so that every rank learns of
a failure on any rank in the same collective and raises, instead of waiting forever in a
collective the failed rank never joins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Reduced:
    """The summed product and what the ranks reported."""

    value: torch.Tensor
    nonfinite: int
    failed_ranks: int


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _comm_device(group, like: torch.device) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones by copying).
    return like if dist.get_backend(group) == "nccl" else torch.device("cpu")


def all_reduce_product(
    local: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    nonfinite: int,
    failed: bool,
    group: dist.ProcessGroup | None = None,
) -> Reduced:
    """Sum ``local`` over the ranks of ``group`` with the counters, in one all-reduce.

    Args:
        local: this rank's product (any shape), or ``None`` if this rank failed.
        shape, dtype, device: what the product looks like on every rank.
        nonfinite: this rank's number of batches with a NaN/inf loss.
        failed: whether this rank's computation raised.
    """
    numel = 1
    for s in shape:
        numel *= s
    comm = _comm_device(group, device)
    buf = torch.zeros(numel + 2, dtype=torch.float64 if dtype == torch.float64 else dtype,
                      device=comm)
    if local is not None:
        buf[:numel] = local.reshape(-1).to(comm, buf.dtype)
    buf[numel] = float(nonfinite)
    buf[numel + 1] = float(failed)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    counters = buf[numel:].tolist()
    value = buf[:numel].reshape(shape).to(device, dtype)
    return Reduced(value, round(counters[0]), round(counters[1]))


def all_reduce_scalar(x: float, device: torch.device, group=None) -> float:
    """Sum a Python float over the ranks (float64)."""
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t.item())


def assert_same_on_all_ranks(V: torch.Tensor, group=None, what: str = "input vectors") -> None:
    """Debug check that every rank multiplies the same vectors (min/max of a checksum).

    The checksum weighs entries by ``sin(position)``, so permuted or sign-flipped
    vectors (two Rademacher draws with equal sums) differ too.
    """
    flat = V.detach().double().reshape(-1)
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    checksum = (flat * torch.sin(position)).sum() + (flat**2).sum()
    pair = torch.stack([checksum, -checksum]).to(_comm_device(group, V.device))
    dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=group)
    if float(pair[0] + pair[1]) > 1e-12 * max(1.0, abs(float(checksum))):
        raise RuntimeError(
            f"ranks disagree on the {what} (checksums range over "
            f"[{-float(pair[1])}, {float(pair[0])}]): seed every rank identically"
        )


def first_rank(group=None) -> int:
    """The global rank of ``group``'s rank 0 (the source of broadcasts)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def shared_seed(device: torch.device, group=None) -> int:
    """A seed drawn by rank 0 of ``group`` from torch's global CPU generator, broadcast.

    For randomized algorithms called with ``seed=None`` on a distributed operator: the
    ranks' global generators usually differ, so each would draw different probes. Rank 0's
    draw (``torch.manual_seed`` on rank 0 controls it) is used by every rank.
    """
    t = torch.zeros(1, dtype=torch.int64, device=_comm_device(group, device))
    if dist.get_rank(group) == 0:
        t[0] = int(torch.randint(2**62, ()))
    dist.broadcast(t, src=first_rank(group), group=group)
    return int(t.item())


def rank_counts(count: int, device: torch.device, group=None) -> list[int]:
    """``count`` of every rank of ``group``, in rank order (one all-reduce)."""
    t = torch.zeros(dist.get_world_size(group), dtype=torch.int64,
                    device=_comm_device(group, device))
    t[dist.get_rank(group)] = count
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [int(c) for c in t.tolist()]


def common_seed(op: object, seed: int | None) -> int | None:
    """``seed``, or for a distributed operator and ``seed=None`` the :func:`shared_seed`.

    Randomized algorithms (trace, diagonal, spectral density) call this first, so that
    with ``seed=None`` every rank still draws the same probes. Single-process operators
    keep ``None`` (torch's global generator, as documented by each algorithm).
    """
    if seed is not None or not getattr(op, "distributed", False):
        return seed
    return shared_seed(op.device, getattr(op, "process_group", None))
