"""Fused Triton kernel for the cross-entropy loss-Hessian product (spec: ``ce_hvp.py``).

One work item is a row ``r`` and a group of ``BLOCK_M`` right-hand sides. Its program

1. streams the row in ``BLOCK_V`` tiles, keeping an online softmax (running max ``m``,
   ``s = sum exp(z - m)``) and ``t_j = sum exp(z - m) u_j`` for the whole group in one
   pass, rescaling both by ``exp(m_old - m_new)`` when the max grows; then
   ``<p, u_j> = t_j / s``;
2. streams the row again, tiles in *reverse* order, writing
   ``out_j = (w / s) exp(z - m) (u_j - <p, u_j>)``.

The reverse second pass re-reads first what the first pass read last, meant to find
those tiles still in L2; measured on an H100 it does not pay off (58 % of copy bandwidth,
the two-pass ceiling without reuse: benchmarks/NOTES_ce_hvp.md). A row of fp32 logits and
one direction at V=50304 is 400 KB, and 132 of them about fill an H100's 50 MB L2. Items
of one row are numbered consecutively so concurrent groups share the row's logits through
L2. The grid is persistent (``PROGRAMS_PER_SM`` programs per SM, striding over items) to
keep that working set bounded. Nothing of size (N, V) is allocated besides the output;
accumulation is in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from torchcurv.kernels.ce_hvp import accumulation_dtype, triton_interpreter_active

# Programs the interpreter runs "concurrently": small, so tests exercise the item loop.
_INTERPRETER_PROGRAMS = 3


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration (the autotuner picks among these on CUDA).

    ``block_v``: vocabulary tile (power of two). ``block_m``: right-hand sides per work item
    (power of two). ``num_warps``: warps per program. ``programs_per_sm``: persistent-grid
    occupancy target. ``stages``: prefetch depth of the first pass (1: none).
    """

    block_v: int
    block_m: int = 1
    num_warps: int = 8
    programs_per_sm: int = 1
    stages: int = 1


@triton.jit
def _ce_hvp_kernel(
    logits_ptr,
    u_ptr,
    w_ptr,
    out_ptr,
    N,
    V,
    M,
    stride_ln,
    stride_um,
    stride_un,
    stride_om,
    stride_on,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
    STAGES: tl.constexpr,
):
    groups = tl.cdiv(M, BLOCK_M)
    items = N * groups
    n_tiles = tl.cdiv(V, BLOCK_V)
    lanes_v = tl.arange(0, BLOCK_V)
    lanes_m = tl.arange(0, BLOCK_M)
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        row = (item // groups).to(tl.int64)
        rhs = (item % groups) * BLOCK_M + lanes_m
        rhs_ok = rhs < M
        z_row = logits_ptr + row * stride_ln
        u_rows = u_ptr + rhs.to(tl.int64)[:, None] * stride_um + row * stride_un
        o_rows = out_ptr + rhs.to(tl.int64)[:, None] * stride_om + row * stride_on

        # Pass 1: online max, sum-exp and <exp(z - m), u_j>, all rescaled together.
        # STAGES > 1 prefetches tiles through shared memory (cp.async) across the reductions'
        # barriers; pass 2 has no barriers and streams without it.
        run_max = tl.full((), float("-inf"), ACC)
        run_sum = tl.zeros((), ACC)
        run_dot = tl.zeros((BLOCK_M,), ACC)
        for k in tl.range(0, n_tiles, num_stages=STAGES):
            cols = k * BLOCK_V + lanes_v
            col_ok = cols < V
            z = tl.load(z_row + cols, mask=col_ok, other=float("-inf")).to(ACC)
            u = tl.load(
                u_rows + cols[None, :], mask=rhs_ok[:, None] & col_ok[None, :], other=0.0
            ).to(ACC)
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            rescale = tl.exp(run_max - new_max)
            e = tl.exp(z - new_max)
            run_sum = run_sum * rescale + tl.sum(e, axis=0)
            run_dot = run_dot * rescale + tl.sum(e[None, :] * u, axis=1)
            run_max = new_max

        p_dot_u = run_dot / run_sum
        if HAS_WEIGHTS:
            p_scale = tl.load(w_ptr + row).to(ACC) / run_sum
        else:
            p_scale = 1.0 / run_sum

        # Pass 2, last tile first: those are the ones most likely still in L2.
        for k in range(0, n_tiles):
            cols = (n_tiles - 1 - k) * BLOCK_V + lanes_v
            col_ok = cols < V
            both_ok = rhs_ok[:, None] & col_ok[None, :]
            z = tl.load(z_row + cols, mask=col_ok, other=float("-inf")).to(ACC)
            u = tl.load(u_rows + cols[None, :], mask=both_ok, other=0.0).to(ACC)
            p_w = tl.exp(z - run_max) * p_scale
            result = p_w[None, :] * (u - p_dot_u[:, None])
            tl.store(o_rows + cols[None, :], result.to(out_ptr.dtype.element_ty), mask=both_ok)


def _autotune_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_V, num_warps, STAGES): one tile of u stays <= 16K elements (registers;
    # checked spill-free for sm_90 with ptxas), and each shape is tried with one and two
    # programs per SM (L2 reuse of the row vs latency hiding).
    shapes = [
        (1, 1024, 4, 1), (1, 2048, 8, 1), (1, 4096, 16, 1), (1, 8192, 16, 1),
        (1, 2048, 8, 3), (1, 4096, 8, 3),
        (4, 1024, 8, 1), (4, 2048, 8, 1), (4, 4096, 16, 1),
        (16, 512, 8, 1), (16, 1024, 16, 1),
    ]  # fmt: skip
    return [
        triton.Config(
            {"BLOCK_V": bv, "BLOCK_M": bm, "PROGRAMS_PER_SM": pps, "STAGES": st},
            num_warps=nw,
            num_stages=1,
        )
        for bm, bv, nw, st in shapes
        for pps in (1, 2)
    ]


def _prune_configs(configs, named_args, **kwargs):
    m = named_args["M"]
    largest_useful = triton.next_power_of_2(m)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= largest_useful]
    return kept or configs[:1]


_ce_hvp_autotuned = triton.autotune(
    configs=_autotune_configs(),
    key=["V", "M", "HAS_WEIGHTS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_ce_hvp_kernel)


def _programs(device: torch.device, programs_per_sm: int, items: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _INTERPRETER_PROGRAMS
    return max(1, min(items, sms * programs_per_sm))


def ce_hessian_matmat_triton(
    logits: torch.Tensor,
    U: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on validated inputs (see ``ce_hessian_matmat``).

    ``config=None`` autotunes on CUDA (keyed on V, M and dtypes) and uses a small fixed
    tile in the CPU interpreter; pass a :class:`KernelConfig` to pin one.
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
    has_weights = weights is not None
    w = weights.to(acc).contiguous() if has_weights else logits  # unread when absent
    args = (
        logits, U3, w, out3, n, v, m,
        logits.stride(0), U3.stride(0), U3.stride(1), out3.stride(0), out3.stride(1),
    )  # fmt: skip
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    if config is None and not triton_interpreter_active():

        def grid(meta):
            items = n * triton.cdiv(m, meta["BLOCK_M"])
            return (_programs(logits.device, meta["PROGRAMS_PER_SM"], items),)

        _ce_hvp_autotuned[grid](*args, HAS_WEIGHTS=has_weights, ACC=acc_tl)
        return out
    if config is None:
        config = KernelConfig(block_v=64, block_m=min(4, triton.next_power_of_2(m)))
    items = n * triton.cdiv(m, config.block_m)
    grid = (_programs(logits.device, config.programs_per_sm, items),)
    _ce_hvp_kernel[grid](
        *args,
        HAS_WEIGHTS=has_weights,
        ACC=acc_tl,
        BLOCK_V=config.block_v,
        BLOCK_M=config.block_m,
        PROGRAMS_PER_SM=config.programs_per_sm,
        STAGES=config.stages,
        num_warps=config.num_warps,
        num_stages=1,
    )
    return out


def best_config() -> KernelConfig | None:
    """The configuration the autotuner chose on its last tuning run, if any."""
    chosen = getattr(_ce_hvp_autotuned, "best_config", None)
    if chosen is None:
        return None
    kw = chosen.kwargs
    return KernelConfig(
        kw["BLOCK_V"], kw["BLOCK_M"], chosen.num_warps, kw["PROGRAMS_PER_SM"], kw["STAGES"]
    )
