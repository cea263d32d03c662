"""The collectives of a distributed curvature operator, and how failures travel in them.

Each rank holds a shard of the data; a product is the sum of the per-rank products. Every
collective torchcurv issues starts with a *checkpoint*: one small all-reduce of two
counters -- ranks that failed, batches whose loss was not finite -- that every rank joins
whatever it is about to do next. A rank whose local work raises (an exception, a
``KeyboardInterrupt``, any ``BaseException``) joins the checkpoint the others are waiting
in with its failure flag set, without waiting for it to complete (:func:`report_failure`),
and re-raises; the others learn of it in that checkpoint and raise
:class:`~torchcurv.RankFailedError` instead of waiting until the process group's timeout,
and since every rank has joined the same number of collectives, the next product pairs
up correctly. The payload (the product, a total, a seed) travels only when no rank failed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from torchcurv.errors import RankFailedError

if TYPE_CHECKING:  # the operators import this module
    from torchcurv.operators.base import LinearOperator

# Failure checkpoints posted without waiting: their buffers must outlive the collective.
_POSTED: list[tuple[object, torch.Tensor]] = []
_REPORTED = "_torchcurv_reported"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Checkpoint:
    """What the ranks reported at one checkpoint."""

    failed_ranks: int
    nonfinite: int


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _comm_device(group, like: torch.device | None) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones by copying).
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return like if like is not None else torch.device("cuda", torch.cuda.current_device())


def _counters(failed: bool, nonfinite: int, device: torch.device | None, group) -> torch.Tensor:
    return torch.tensor([float(failed), float(nonfinite)], dtype=torch.float64,
                        device=_comm_device(group, device))


def checkpoint(device: torch.device | None, group=None, *, nonfinite: int = 0,
               what: str = "this collective") -> Checkpoint:
    """Join the checkpoint that starts every collective; raise if another rank failed.

    Raises:
        RankFailedError: some rank failed since the last checkpoint (its own traceback
            says why); marked as reported, so that no guard reports it again.
    """
    buf = _counters(False, nonfinite, device, group)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    failed, bad = (round(x) for x in buf.tolist())
    if failed:
        err = RankFailedError(
            f"{failed} other rank(s) raised before or during {what}; see their tracebacks"
        )
        setattr(err, _REPORTED, True)
        raise err
    return Checkpoint(failed, bad)


def report_failure(exc: BaseException, device: torch.device | None, group=None) -> None:
    """Join the other ranks' next checkpoint with this rank's failure flag, once per error.

    The collective is posted without waiting for it: the others may be at their
    checkpoint already (a product) or reach it later (their next product, or never, if
    this was the last collective; then it is left pending). The rank then re-raises.
    """
    if getattr(exc, _REPORTED, False):
        return
    try:
        setattr(exc, _REPORTED, True)
    except AttributeError:  # exceptions with __slots__ cannot be marked: report anyway
        pass
    buf = _counters(True, 0, device, group)
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
    _POSTED.append((work, buf))


@contextlib.contextmanager
def failures_reported(device: torch.device | None, group=None,
                      active: bool = True) -> Iterator[None]:
    """Report any ``BaseException`` escaping the block to the other ranks' next checkpoint.

    Wraps torchcurv's distributed work between collectives (construction, products,
    the algorithms' own loops), so that a rank that fails anywhere in it makes the others
    raise at their next checkpoint instead of hanging.
    """
    if not active:
        yield
        return
    try:
        yield
    except BaseException as exc:
        report_failure(exc, device, group)
        raise


def _mark_reported(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises at the same collective: nothing to report."""
    setattr(exc, _REPORTED, True)
    return exc


def all_reduce_sum(local: torch.Tensor, group=None, *, checkpointed: bool = False
                   ) -> torch.Tensor:
    """Sum ``local`` over the ranks, returned on its device and in its dtype.

    Runs its own checkpoint first unless the caller has just run one
    (``checkpointed=True``: a product, whose checkpoint also carries its NaN counts).
    """
    if not checkpointed:
        checkpoint(local.device, group)
    comm = _comm_device(group, local.device)
    buf = local.detach().to(comm, torch.float64 if local.dtype == torch.float64
                            else local.dtype).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(local.device, local.dtype)


def all_reduce_min(x: int, device: torch.device, group=None) -> int:
    """The smallest of the ranks' ``x``, after a checkpoint."""
    checkpoint(device, group)
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def all_reduce_scalar(x: float, device: torch.device, group=None) -> float:
    """Sum a Python float over the ranks (float64), after a checkpoint."""
    checkpoint(device, group)
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t.item())


def assert_same_on_all_ranks(V: torch.Tensor, group=None, what: str = "input vectors") -> None:
    """Debug check that every rank multiplies the same vectors (min/max of a checksum).

    The checksum weighs entries by ``sin(position)``, so permuted or sign-flipped
    vectors (two Rademacher draws with equal sums) differ too.
    """
    checkpoint(V.device, group)
    flat = V.detach().double().reshape(-1)
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    checksum = (flat * torch.sin(position)).sum() + (flat**2).sum()
    pair = torch.stack([checksum, -checksum]).to(_comm_device(group, V.device))
    dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=group)
    if float(pair[0] + pair[1]) > 1e-12 * max(1.0, abs(float(checksum))):
        raise _mark_reported(RuntimeError(
            f"ranks disagree on the {what} (checksums range over "
            f"[{-float(pair[1])}, {float(pair[0])}]): seed every rank identically"
        ))


def value_ranges(values: list[float], device: torch.device, group=None) -> list[tuple[float,
                                                                                       float]]:
    """``(min, max)`` over the ranks of each of ``values`` (one MAX all-reduce)."""
    checkpoint(device, group)
    t = torch.tensor(values, dtype=torch.float64)
    both = torch.cat([t, -t]).to(_comm_device(group, device))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    k = len(values)
    out = both.tolist()
    return [(-out[k + i], out[i]) for i in range(k)]


def first_rank(group=None) -> int:
    """The global rank of ``group``'s rank 0 (the source of broadcasts)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def shared_seed(device: torch.device, group=None) -> int:
    """A seed drawn by rank 0 of ``group`` from torch's global CPU generator, broadcast.

    For randomized algorithms called with ``seed=None`` on a distributed operator: the
    ranks' global generators usually differ, so each would draw different probes. Rank 0's
    draw (``torch.manual_seed`` on rank 0 controls it) is used by every rank.
    """
    checkpoint(device, group)
    t = torch.zeros(1, dtype=torch.int64, device=_comm_device(group, device))
    if dist.get_rank(group) == 0:
        t[0] = int(torch.randint(2**62, ()))
    dist.broadcast(t, src=first_rank(group), group=group)
    return int(t.item())


def rank_counts(count: int, device: torch.device, group=None) -> list[int]:
    """``count`` of every rank of ``group``, in rank order (one all-reduce)."""
    checkpoint(device, group)
    t = torch.zeros(dist.get_world_size(group), dtype=torch.int64,
                    device=_comm_device(group, device))
    t[dist.get_rank(group)] = count
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [int(c) for c in t.tolist()]


def common_seed(op: LinearOperator, seed: int | None) -> int | None:
    """``seed``, or for a distributed operator and ``seed=None`` the :func:`shared_seed`.

    Randomized algorithms (trace, diagonal, spectral density) call this first, so that
    with ``seed=None`` every rank still draws the same probes. Single-process operators
    keep ``None`` (torch's global generator, as documented by each algorithm).
    """
    if seed is not None or not getattr(op, "distributed", False):
        return seed
    return shared_seed(op.device, getattr(op, "process_group", None))


def guarded(op: object) -> contextlib.AbstractContextManager[None]:
    """:func:`failures_reported` for an algorithm running on ``op`` (a no-op when local)."""
    return failures_reported(getattr(op, "device", None), getattr(op, "process_group", None),
                             active=bool(getattr(op, "distributed", False)))


def parameter_agreement(kind: str, names: list[str], params: Sequence[torch.Tensor], *,
                        compare_values: bool = True, group=None) -> None:
    """Raise on every rank unless all ranks build the same operator on the same weights.

    Compares, in one MAX all-reduce (after a checkpoint): the operator's class and the
    selected parameters' names, shapes and dtypes (a hash), ``n``, and -- unless the
    parameters are shards (FSDP2) -- two checksums of their values (sum and sum of
    squares, in float64: one pass over the weights). Ranks that differ here would
    otherwise abort inside the backend (products of different lengths) or silently sum
    the curvature of different models.
    """
    layout = "|".join([kind] + [f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in
                                zip(names, params)])
    digest = int(hashlib.sha256(layout.encode()).hexdigest()[:12], 16)  # exact in float64
    n = sum(p.numel() for p in params)
    values = [float(n), float(digest)]
    if compare_values:
        with torch.no_grad():
            flat = [p.detach() for p in params]
            values.append(float(sum(t.double().sum() for t in flat)))
            values.append(float(sum((t.double() ** 2).sum() for t in flat)))
    device = params[0].device
    (n_lo, n_hi), (d_lo, d_hi), *sums = value_ranges(values, device, group)
    if n_lo != n_hi:
        raise _mark_reported(ValueError(
            f"ranks disagree on n, the number of selected parameter entries: it ranges over "
            f"[{round(n_lo)}, {round(n_hi)}] (this rank: {n}); every rank must build the "
            "operator on the same model and parameter selection"
        ))
    if d_lo != d_hi:
        raise _mark_reported(ValueError(
            f"ranks disagree on the {kind}'s selected parameters (names, shapes or dtypes "
            f"differ; this rank's first: {names[:3]}); every rank must build the same "
            "operator on the same model and parameter selection"
        ))
    for what, (lo, hi) in zip(("sum", "sum of squares"), sums):
        if hi - lo > 1e-10 * max(1.0, abs(hi), abs(lo)):
            raise _mark_reported(ValueError(
                f"the selected parameters' values differ between ranks (their {what} "
                f"ranges over [{lo!r}, {hi!r}]): the operator would sum the curvature of "
                "different models. Give every rank the same weights (DistributedDataParallel "
                "broadcasts rank 0's at its construction; or seed every rank identically)"
            ))


def reports_failures(fn: F) -> F:
    """Run an algorithm ``fn(op, ...)`` under :func:`guarded` ``(op)``.

    The public algorithms (eigsh, trace, diagonal, spectral density) run their own loops
    between products on every rank; a rank failing there (a callback raising, an
    interrupt) makes the others raise at their next product's checkpoint.
    """
    @functools.wraps(fn)
    def wrapper(op: Any, *args: Any, **kwargs: Any) -> Any:
        with guarded(op):
            return fn(op, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
