"""Fused Triton kernel for the cross-entropy loss-Hessian product (spec: ``ce_hvp.py``).

Every output element needs three row-global numbers (max, ``s = sum exp(z - max)`` and
``<p, u_j>``), so a kernel either reads each row twice (stats, then output) or keeps the
row on chip while the statistics are formed. Two reads cost 5/3 of the bytes that must
move and cap a two-pass kernel near 60 % of the copy bandwidth (measured: 58 %); a row of
fp32 logits and one direction at V=50304 is 400 KB, more than one SM holds. So a row is
split over ``split`` programs, each holding one chunk of it in registers. A *segment* is
one row and a group of ``BLOCK_M`` directions; the program for one chunk of a segment

1. loads its chunk of ``z`` and of the ``u_j`` once and forms the chunk's
   ``(max, sum exp(z - max), sum exp(z - max) u_j)``;
2. publishes those partials to a small workspace and waits on the segment's counter until
   the other chunks have published theirs;
3. combines the partials and writes ``out_j = (w / s) exp(z - max) (u_j - <p, u_j>)``
   from the registers.

Each byte of logits and directions is read once. ``maxnreg`` trades instruction-level
parallelism for more resident programs. Holding more bytes per SM does not by itself make
bf16 faster: a variant that keeps bf16 packed (a third more resident) measured slower;
benchmarks/NOTES_ce_hvp.md has that and the other designs measured.

The wait cannot deadlock: a program takes its work item from an atomic ticket counter, so
items start in ticket order, every chunk a waiting program needs has a smaller or a
not-yet-taken ticket, and only the last segment begun can be incomplete; it completes as
long as ``split`` programs fit on the GPU at once (the host caps ``split`` at the number
of SMs). The Triton CPU interpreter runs programs one after another, so there a row is one
chunk (``split = 1``, no waiting).

Extra memory: the output, plus counters and partials of ``N * groups * split * (2 +
BLOCK_M)`` floats (1.3 MB at N=8192, V=50304, M=1). Accumulation is in float32 (float64
for float64 inputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from torchcurv.dtypes import accumulation_dtype
from torchcurv.kernels.triton_env import triton_interpreter_active

# Chunk starts are multiples of this many elements, so that when the row stride is one too,
# every chunk keeps 16-byte vector loads.
_CHUNK_ALIGN = 16


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration.

    ``chunk``: vocabulary elements one program holds (power of two); a row is split over
    ``ceil(V / chunk)`` programs. ``block_m``: right-hand sides per program (power of two).
    ``num_warps``: warps per program. ``maxnreg``: register cap per thread passed to
    ptxas (``None``: its choice).
    """

    chunk: int
    block_m: int = 1
    num_warps: int = 4
    maxnreg: int | None = None


@triton.jit
def _ce_hvp_kernel(
    logits_ptr,
    u_ptr,
    w_ptr,
    out_ptr,
    counter_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_dot_ptr,
    V,
    M,
    span,
    split,
    stride_ln,
    stride_um,
    stride_un,
    stride_om,
    stride_on,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_P2: tl.constexpr,
):
    # SPLIT_P2 == 1: the program owns a whole row and never waits (the interpreter's mode).
    if SPLIT_P2 > 1:
        item = tl.atomic_add(counter_ptr, 1)  # the ticket (counter_ptr[0]): see the docstring
    else:
        item = tl.program_id(0)
    segment = item // split  # one row and one group of BLOCK_M directions
    chunk = item % split
    groups = tl.cdiv(M, BLOCK_M)
    row = (segment // groups).to(tl.int64)
    lanes_m = tl.arange(0, BLOCK_M)
    rhs = (segment % groups) * BLOCK_M + lanes_m
    lanes = tl.arange(0, CHUNK)
    cols = chunk * span + lanes
    col_ok = (lanes < span) & (cols < V)
    both_ok = (rhs < M)[:, None] & col_ok[None, :]
    u_at = rhs.to(tl.int64)[:, None] * stride_um + row * stride_un + cols[None, :]
    o_at = rhs.to(tl.int64)[:, None] * stride_om + row * stride_on + cols[None, :]

    z = tl.load(logits_ptr + row * stride_ln + cols, mask=col_ok, other=float("-inf"))
    u = tl.load(u_ptr + u_at, mask=both_ok, other=0.0)
    local_max = tl.max(z.to(ACC), axis=0)
    # A chunk of only -inf logits contributes nothing (instead of exp(-inf + inf) = NaN).
    shift = tl.where(local_max == float("-inf"), 0.0, local_max)
    e = tl.exp(z.to(ACC) - shift)
    local_sum = tl.sum(e, axis=0)
    local_dot = tl.sum(e[None, :] * u.to(ACC), axis=1)

    if SPLIT_P2 > 1:
        # Publish, then wait for the row's other chunks. Triton stores these scalars from
        # one thread, the one that then releases the counter; they write through to L2.
        at = segment * split + chunk
        tl.store(part_max_ptr + at, local_max, cache_modifier=".wt")
        tl.store(part_sum_ptr + at, local_sum, cache_modifier=".wt")
        tl.store(part_dot_ptr + at * BLOCK_M + lanes_m, local_dot, cache_modifier=".wt")
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + 1 + segment, 1, sem="acq_rel") + 1
        while arrived < split:
            arrived = tl.atomic_add(counter_ptr + 1 + segment, 0, sem="acquire")
        parts = segment * split + tl.arange(0, SPLIT_P2)
        part_ok = tl.arange(0, SPLIT_P2) < split
        maxes = tl.load(
            part_max_ptr + parts, mask=part_ok, other=float("-inf"), cache_modifier=".cv"
        )
        sums = tl.load(part_sum_ptr + parts, mask=part_ok, other=0.0, cache_modifier=".cv")
        dots = tl.load(
            part_dot_ptr + parts[:, None] * BLOCK_M + lanes_m[None, :],
            mask=part_ok[:, None],
            other=0.0,
            cache_modifier=".cv",
        )
        row_max = tl.max(maxes, axis=0)
        rescale = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - row_max))
        row_sum = tl.sum(sums * rescale, axis=0)
        row_dot = tl.sum(dots * rescale[:, None], axis=0)
    else:
        row_max = local_max
        row_sum = local_sum
        row_dot = local_dot

    p_dot_u = row_dot / row_sum
    if HAS_WEIGHTS:
        p_scale = tl.load(w_ptr + row).to(ACC) / row_sum
    else:
        p_scale = 1.0 / row_sum
    own = tl.where(local_max == float("-inf"), 0.0, tl.exp(shift - row_max))
    p = e * (own * p_scale)
    result = p[None, :] * (u.to(ACC) - p_dot_u[:, None])
    tl.store(out_ptr + o_at, result.to(out_ptr.dtype.element_ty), mask=both_ok)


def default_config(v: int, m: int, itemsize: int) -> KernelConfig:
    """The configuration used when none is given: among the fastest in each of the H100
    runs of ``benchmarks/ce_hvp.py --sweep`` (which differ by up to 10 % run to run;
    benchmarks/NOTES_ce_hvp.md).

    Args:
        v: vocabulary size. m: number of right-hand sides. itemsize: bytes per element of
        the larger of the logits' and the directions' dtypes.
    """
    if triton_interpreter_active():
        return KernelConfig(chunk=_p2(v), block_m=min(4, _p2(m)))
    if m == 1:
        return KernelConfig(chunk=min(4096 if itemsize >= 4 else 8192, _p2(v)))
    block_m = min(8, _p2(m))
    maxnreg = 80 if itemsize <= 2 else None
    return KernelConfig(chunk=min(8192 // block_m, _p2(v)), block_m=block_m, maxnreg=maxnreg)


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


def row_split(v: int, chunk: int, max_split: int) -> tuple[int, int]:
    """``(split, span)``: programs per row and the elements each covers (``span <= chunk``).

    Spans are balanced and rounded up to a multiple of 16 elements; ``chunk`` grows (to a
    larger power of two) when ``v / chunk`` would exceed ``max_split``.
    """
    while triton.cdiv(v, chunk) > max_split:
        chunk *= 2
    split = triton.cdiv(v, chunk)
    span = min(chunk, triton.cdiv(triton.cdiv(v, split), _CHUNK_ALIGN) * _CHUNK_ALIGN)
    return triton.cdiv(v, span), span


def ce_hessian_matmat_triton(
    logits: torch.Tensor,
    U: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on validated inputs (see ``ce_hessian_matmat``).

    ``config=None`` uses :func:`default_config`. Under the CPU interpreter every row is
    one chunk whatever ``config.chunk`` says.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if U.stride(-1) != 1:
        U = U.contiguous()
    U3 = U.unsqueeze(0) if U.ndim == 2 else U
    if out is None:
        out = torch.empty_like(U, memory_format=torch.contiguous_format)
    out3 = out.unsqueeze(0) if out.ndim == 2 else out
    m, n, v = U3.shape
    if n == 0 or m == 0:
        return out
    acc = accumulation_dtype(logits.dtype, U.dtype)
    if config is None:
        config = default_config(v, m, max(logits.element_size(), U.element_size()))
    # The interpreter runs programs one after another: a split row would wait forever.
    max_split = 1 if triton_interpreter_active() else _multiprocessors(logits.device.index)
    split, span = row_split(v, config.chunk, max_split)
    segments = n * triton.cdiv(m, config.block_m)
    if split > 1:
        counters = torch.zeros(1 + segments, dtype=torch.int32, device=logits.device)
        parts = torch.empty(
            segments * split * (2 + config.block_m), dtype=acc, device=logits.device
        )
        part_max, part_sum, part_dot = parts.split(
            [segments * split, segments * split, segments * split * config.block_m]
        )
    else:
        counters = part_max = part_sum = part_dot = logits  # never read with SPLIT_P2 == 1
    has_weights = weights is not None
    w = weights.to(acc).contiguous() if weights is not None else logits  # unread when absent
    _ce_hvp_kernel[(segments * split,)](
        logits, U3, w, out3, counters, part_max, part_sum, part_dot,
        v, m, span, split,
        logits.stride(0), U3.stride(0), U3.stride(1), out3.stride(0), out3.stride(1),
        HAS_WEIGHTS=has_weights,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        CHUNK=triton.next_power_of_2(span),
        BLOCK_M=config.block_m,
        SPLIT_P2=triton.next_power_of_2(split),
        maxnreg=config.maxnreg,
        num_warps=config.num_warps,
        num_stages=1,
    )  # fmt: skip
    return out


@functools.cache
def _multiprocessors(device_index: int) -> int:
    # Queried on every launch, and the answer never changes.
    return torch.cuda.get_device_properties(device_index).multi_processor_count
