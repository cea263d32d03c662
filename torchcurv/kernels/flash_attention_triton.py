"""Triton kernels for flash-style attention and its derivatives (spec: math SDPA).

Four passes, each tiled over ``(BLOCK_M query rows) x (BLOCK_N keys)`` so that no
``(T, T)`` matrix exists outside a tile. ``S = scale Q Kᵀ + mask``, ``P = softmax(S)``:

* forward: ``O = P V`` by the online softmax; it keeps ``lse = log sum_j exp S_ij`` per
  row, which lets the other passes form any tile of ``P`` exactly as ``exp(S - lse)``;
* backward (two kernels, so that each output tile has one writer and no atomics):
  ``dS = P ∘ (dO Vᵀ - delta)`` with ``delta = rowsum(dO ∘ O) - g_lse``; ``dV = Pᵀ dO`` and
  ``dK = scale dSᵀ Q`` over key tiles, ``dQ = scale dS K`` over query tiles;
* JVP: with ``Ṡ = scale (Q̇ Kᵀ + Q K̇ᵀ)``, ``Ȯ = P (Ṡ ∘ ...) `` written out per row as
  ``Ȯ_i = sum_j P_ij (Ṡ_ij V_j + V̇_j) - r_i O_i`` and ``l̇se_i = r_i = sum_j P_ij Ṡ_ij``;
* JVP of the backward (two kernels, split as the backward's): with ``Ṗ = P ∘ (Ṡ - l̇se)``,
  ``dṠ = Ṗ ∘ (dP - delta) + P ∘ (dȮ Vᵀ + dO V̇ᵀ - deltȧ)``, the tangents
  ``dV̇ = Ṗᵀ dO + Pᵀ dȮ``, ``dK̇ = scale (dṠᵀ Q + dSᵀ Q̇)``, ``dQ̇ = scale (dṠ K + dS K̇)``;
  eighteen tile products per tile pair (both kernels) against the backward's seven, so
  about 2.6x its flops.

Batches: a program works on batch ``z`` of the pass's outputs; primal inputs (``Q, K, V,
O, lse``) are read at ``z % BP`` and the mask at ``z % BMASK``. A vmapped block of
tangents (or cotangents) is folded into the batch axis, ``z = vector * B + b``, and reads
the one copy of the primals without expanding them (the JVP of the backward reads its
cotangents ``dO, delta`` at ``z % BG`` likewise). GQA: query head ``h`` reads key/value
head ``h // GROUP``; the backward writes ``dK, dV`` per query head and the caller sums
each group (one writer per tile again).

Products run in the inputs' dtype with float32 accumulation for float16/bfloat16 (as the
fused SDPA kernels do: ``P`` is rounded to the value dtype before ``P V``), in IEEE
float32 for float32 inputs (no TF32: math SDPA does not use it by default) and in float64
for float64 inputs (the interpreter's exactness tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from torchcurv.kernels.triton_env import triton_interpreter_active

MASK_NONE, MASK_ADD = 0, 1


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: tile sizes (powers of two, at least 16 for ``tl.dot``)
    and warps per program."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, itemsize: int, backward: bool) -> TileConfig:
    """Tiles that keep a program's accumulators in registers; no autotuning, so that a
    launch never depends on a timing run. The interpreter gets the smallest tiles (each
    program costs the same there, and small tiles cross more tile edges in tests)."""
    if triton_interpreter_active():
        return TileConfig(16, 16)
    wide = head_dim > 64
    if backward:
        return TileConfig(64, 64 if not (wide and itemsize >= 4) else 32, 8 if wide else 4)
    return TileConfig(64 if not wide else 128 if itemsize <= 2 else 64,
                      64 if not (wide and itemsize >= 4) else 32, 8 if wide else 4)


def backward_jvp_config(head_dim: int, itemsize: int) -> TileConfig:
    """Tiles for the JVP of the backward. A program keeps the tangents of ``P`` and ``dS``
    and of every input tile beside the backward's own, so it gets half the backward's
    query tile and twice its warps, to hold them in registers rather than spill; the
    benchmark ``benchmarks/attention_products.py`` sweeps the alternatives."""
    if triton_interpreter_active():
        return TileConfig(16, 16)
    return TileConfig(32, 64 if not (head_dim > 64 and itemsize >= 4) else 32, 8)


@triton.jit
def _full_scale(hi, lo, ACC: tl.constexpr):
    """The score scale in ``ACC`` from its float32 parts (:func:`_scale_parts`)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


def _scale_parts(scale: float) -> tuple[float, float]:
    """``scale`` as float32 high and low parts whose float64 sum is ``scale`` to about
    48 bits. Why: Triton passes a Python float as a float32 argument, so the float64
    kernels were only as exact as float32 whenever the scale (``1 / sqrt(D)``) is not a
    float32 number (head dimension 8; the float64 GPU test caught it)."""
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(torch.tensor(scale - hi, dtype=torch.float32))


@triton.jit
def _program_heads(H, GROUP):
    """``(z, h, hk)`` of this program: batch (int64, so that offsets cannot overflow),
    query head and the key/value head it reads."""
    zh = tl.program_id(1)
    h = zh % H
    return (zh // H).to(tl.int64), h, h // GROUP


@triton.jit
def _rows(base, offs, stride_row, stride_col, offs_col, n_rows, n_cols):
    """The ``(len(offs), len(offs_col))`` tile at rows ``offs`` (zero outside the tensor)."""
    return tl.load(base + offs[:, None] * stride_row + offs_col[None, :] * stride_col,
                   mask=(offs[:, None] < n_rows) & (offs_col[None, :] < n_cols), other=0.0)


@triton.jit
def _store_rows(base, offs, stride_row, stride_col, offs_col, n_rows, n_cols, value):
    """Stores a tile where :func:`_rows` would load it, in the tensor's dtype."""
    tl.store(base + offs[:, None] * stride_row + offs_col[None, :] * stride_col,
             value.to(base.dtype.element_ty),
             mask=(offs[:, None] < n_rows) & (offs_col[None, :] < n_cols))


@triton.jit
def _scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_ptr, smm, smn,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
            ACC: tl.constexpr):
    """The ``(BLOCK_M, BLOCK_N)`` tile of ``S`` (``-inf`` where masked or out of range)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale
    valid = (offs_n[None, :] < Tk) & (offs_m[:, None] < Tq)
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND != 0:
        at = mask_ptr + offs_m[:, None].to(tl.int64) * smm + offs_n[None, :] * smn
        inside = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
        s = s + tl.load(at, mask=inside, other=0.0).to(ACC)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _probabilities(s, lse):
    # Rows with every key masked have lse = -inf and P = 0 (math SDPA gives zeros too).
    safe = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(lse[:, None] == float("-inf"), 0.0, tl.exp(s - safe[:, None]))


@triton.jit
def _fwd_kernel(
    Q, K, V, Mask, O, L,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, soz, soh, som, sod, slz, slh, slm,
    H, GROUP, Tq, Tk, D, DV, BMASK, scale_hi, scale_lo,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    scale = _full_scale(scale_hi, scale_lo, ACC)
    pid_m = tl.program_id(0)
    z, h, hk = _program_heads(H, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Tq
    q = _rows(Q + z * sqz + h * sqh, offs_m, sqm, sqd, offs_d, Tq, D)
    k_base = K + z * skz + hk * skh
    v_base = V + z * svz + hk * svh
    mask_base = Mask + (z % BMASK) * smz + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k = _rows(k_base, offs_n, skn, skd, offs_d, Tk, D)
        v = _rows(v_base, offs_n, svn, svd, offs_dv, Tk, DV)
        s = _scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_base, smm, smn,
                    IS_CAUSAL, MASK_KIND, PREC, ACC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no key seen yet keeps shift 0, so exp(-inf - 0) = 0 instead of NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(ACC)
        m_i = m_new
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    _store_rows(O + z * soz + h * soh, offs_m, som, sod, offs_dv, Tq, DV, o)
    tl.store(L + z * slz + h * slh + offs_m * slm, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Mask, L, DO, Delta, DK, DV_,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, slz, slh, slm, sdoz, sdoh, sdom, sdod, sdez, sdeh, sdem,
    sdkz, sdkh, sdkn, sdkd, sdvz, sdvh, sdvn, sdvd,
    H, GROUP, Tq, Tk, D, DV, BP, BMASK, scale_hi, scale_lo,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    scale = _full_scale(scale_hi, scale_lo, ACC)
    pid_n = tl.program_id(0)
    z, h, hk = _program_heads(H, GROUP)
    zp = z % BP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_m = tl.arange(0, BLOCK_M)
    k = _rows(K + zp * skz + hk * skh, offs_n, skn, skd, offs_d, Tk, D)
    v = _rows(V + zp * svz + hk * svh, offs_n, svn, svd, offs_dv, Tk, DV)
    q_base = Q + zp * sqz + h * sqh
    do_base = DO + z * sdoz + h * sdoh
    mask_base = Mask + (z % BMASK) * smz + h * smh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    for start_m in range(lo, Tq, BLOCK_M):
        offs_m = start_m + arange_m
        row_ok = offs_m < Tq
        q = _rows(q_base, offs_m, sqm, sqd, offs_d, Tq, D)
        do = _rows(do_base, offs_m, sdom, sdod, offs_dv, Tq, DV)
        lse = tl.load(L + zp * slz + h * slh + offs_m * slm, mask=row_ok,
                      other=float("-inf"))
        delta = tl.load(Delta + z * sdez + h * sdeh + offs_m * sdem, mask=row_ok, other=0.0)
        s = _scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_base, smm, smn,
                    IS_CAUSAL, MASK_KIND, PREC, ACC)
        p = _probabilities(s, lse)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(ACC)
    dk = dk * scale
    _store_rows(DK + z * sdkz + h * sdkh, offs_n, sdkn, sdkd, offs_d, Tk, D, dk)
    _store_rows(DV_ + z * sdvz + h * sdvh, offs_n, sdvn, sdvd, offs_dv, Tk, DV, dv)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Mask, L, DO, Delta, DQ,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, slz, slh, slm, sdoz, sdoh, sdom, sdod, sdez, sdeh, sdem,
    sdqz, sdqh, sdqm, sdqd,
    H, GROUP, Tq, Tk, D, DV, BP, BMASK, scale_hi, scale_lo,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    scale = _full_scale(scale_hi, scale_lo, ACC)
    pid_m = tl.program_id(0)
    z, h, hk = _program_heads(H, GROUP)
    zp = z % BP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Tq
    q = _rows(Q + zp * sqz + h * sqh, offs_m, sqm, sqd, offs_d, Tq, D)
    do = _rows(DO + z * sdoz + h * sdoh, offs_m, sdom, sdod, offs_dv, Tq, DV)
    lse = tl.load(L + zp * slz + h * slh + offs_m * slm, mask=row_ok, other=float("-inf"))
    delta = tl.load(Delta + z * sdez + h * sdeh + offs_m * sdem, mask=row_ok, other=0.0)
    k_base = K + zp * skz + hk * skh
    v_base = V + zp * svz + hk * svh
    mask_base = Mask + (z % BMASK) * smz + h * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k = _rows(k_base, offs_n, skn, skd, offs_d, Tk, D)
        v = _rows(v_base, offs_n, svn, svd, offs_dv, Tk, DV)
        s = _scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_base, smm, smn,
                    IS_CAUSAL, MASK_KIND, PREC, ACC)
        p = _probabilities(s, lse)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(ACC)
    dq = dq * scale
    _store_rows(DQ + z * sdqz + h * sdqh, offs_m, sdqm, sdqd, offs_d, Tq, D, dq)


@triton.jit
def _jvp_kernel(
    Q, K, V, Mask, O, L, TQ, TK, TV, TO, TL,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, soz, soh, som, sod, slz, slh, slm,
    stqz, stqh, stqm, stqd, stkz, stkh, stkn, stkd, stvz, stvh, stvn, stvd,
    stoz, stoh, stom, stod, stlz, stlh, stlm,
    H, GROUP, Tq, Tk, D, DV, BP, BMASK, scale_hi, scale_lo,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TQ: tl.constexpr,
    HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    scale = _full_scale(scale_hi, scale_lo, ACC)
    pid_m = tl.program_id(0)
    z, h, hk = _program_heads(H, GROUP)
    zp = z % BP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Tq
    q = _rows(Q + zp * sqz + h * sqh, offs_m, sqm, sqd, offs_d, Tq, D)
    if HAS_TQ:
        tq = _rows(TQ + z * stqz + h * stqh, offs_m, stqm, stqd, offs_d, Tq, D)
    lse = tl.load(L + zp * slz + h * slh + offs_m * slm, mask=row_ok, other=float("-inf"))
    k_base = K + zp * skz + hk * skh
    v_base = V + zp * svz + hk * svh
    tk_base = TK + z * stkz + hk * stkh
    tv_base = TV + z * stvz + hk * stvh
    mask_base = Mask + (z % BMASK) * smz + h * smh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    r = tl.zeros([BLOCK_M], dtype=ACC)
    hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k = _rows(k_base, offs_n, skn, skd, offs_d, Tk, D)
        v = _rows(v_base, offs_n, svn, svd, offs_dv, Tk, DV)
        s = _scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_base, smm, smn,
                    IS_CAUSAL, MASK_KIND, PREC, ACC)
        p = _probabilities(s, lse)
        if HAS_TQ or HAS_TK:
            ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            if HAS_TQ:
                ds += tl.dot(tq, tl.trans(k.to(tq.dtype)), input_precision=PREC).to(ACC)
            if HAS_TK:
                tk = _rows(tk_base, offs_n, stkn, stkd, offs_d, Tk, D)
                ds += tl.dot(q.to(tk.dtype), tl.trans(tk), input_precision=PREC).to(ACC)
            pds = p * (ds * scale)
            r += tl.sum(pds, axis=1)
            acc += tl.dot(pds.to(v.dtype), v, input_precision=PREC).to(ACC)
        if HAS_TV:
            tv = _rows(tv_base, offs_n, stvn, stvd, offs_dv, Tk, DV)
            acc += tl.dot(p.to(tv.dtype), tv, input_precision=PREC).to(ACC)
    o = _rows(O + zp * soz + h * soh, offs_m, som, sod, offs_dv, Tq, DV).to(ACC)
    out = acc - r[:, None] * o
    _store_rows(TO + z * stoz + h * stoh, offs_m, stom, stod, offs_dv, Tq, DV, out)
    tl.store(TL + z * stlz + h * stlh + offs_m * stlm, r, mask=row_ok)


@triton.jit
def _bwd_jvp_tile(q, tq, do, tdo, lse, tlse, delta, tdelta, k, tk, v, tv, scale, offs_m,
                  offs_n, Tq, Tk, mask_base, smm, smn, IS_CAUSAL: tl.constexpr,
                  MASK_KIND: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """``(P, Ṗ, dS, dṠ)`` of one tile: the backward's ``P`` and ``dS`` with their tangents
    ``Ṗ = P ∘ (Ṡ - l̇se)`` and ``dṠ = Ṗ ∘ (dP - delta) + P ∘ (dṖ - deltȧ)``."""
    p = _probabilities(_scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_base, smm, smn,
                               IS_CAUSAL, MASK_KIND, PREC, ACC), lse)
    s_dot = (tl.dot(tq, tl.trans(k), input_precision=PREC).to(ACC)
             + tl.dot(q, tl.trans(tk), input_precision=PREC).to(ACC)) * scale
    p_dot = p * (s_dot - tlse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC) - delta[:, None]
    dp_dot = (tl.dot(tdo, tl.trans(v), input_precision=PREC).to(ACC)
              + tl.dot(do, tl.trans(tv), input_precision=PREC).to(ACC)) - tdelta[:, None]
    return p, p_dot, p * dp, p_dot * dp + p * dp_dot


@triton.jit
def _bwd_jvp_dkdv_kernel(
    Q, K, V, Mask, L, DO, Delta, TQ, TK, TV, TL, TDO, TDelta, DK, DV_,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, slz, slh, slm, sdoz, sdoh, sdom, sdod, sdez, sdeh, sdem,
    stqz, stqh, stqm, stqd, stkz, stkh, stkn, stkd, stvz, stvh, stvn, stvd,
    stlz, stlh, stlm, stdoz, stdoh, stdom, stdod, stdez, stdeh, stdem,
    sdkz, sdkh, sdkn, sdkd, sdvz, sdvh, sdvn, sdvd,
    H, GROUP, Tq, Tk, D, DV, BP, BG, BMASK, scale_hi, scale_lo,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    scale = _full_scale(scale_hi, scale_lo, ACC)
    # Tangents of dK = scale dSᵀ Q and dV = Pᵀ dO for one key tile, over query tiles.
    pid_n = tl.program_id(0)
    z, h, hk = _program_heads(H, GROUP)
    zp = z % BP
    zg = z % BG
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_m = tl.arange(0, BLOCK_M)
    k = _rows(K + zp * skz + hk * skh, offs_n, skn, skd, offs_d, Tk, D)
    v = _rows(V + zp * svz + hk * svh, offs_n, svn, svd, offs_dv, Tk, DV)
    tk = _rows(TK + z * stkz + hk * stkh, offs_n, stkn, stkd, offs_d, Tk, D)
    tv = _rows(TV + z * stvz + hk * stvh, offs_n, stvn, stvd, offs_dv, Tk, DV)
    mask_base = Mask + (z % BMASK) * smz + h * smh
    dk_dot = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv_dot = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    for start_m in range(lo, Tq, BLOCK_M):
        offs_m = start_m + arange_m
        row_ok = offs_m < Tq
        q = _rows(Q + zp * sqz + h * sqh, offs_m, sqm, sqd, offs_d, Tq, D)
        tq = _rows(TQ + z * stqz + h * stqh, offs_m, stqm, stqd, offs_d, Tq, D)
        do = _rows(DO + zg * sdoz + h * sdoh, offs_m, sdom, sdod, offs_dv, Tq, DV)
        tdo = _rows(TDO + z * stdoz + h * stdoh, offs_m, stdom, stdod, offs_dv, Tq, DV)
        lse = tl.load(L + zp * slz + h * slh + offs_m * slm, mask=row_ok, other=float("-inf"))
        tlse = tl.load(TL + z * stlz + h * stlh + offs_m * stlm, mask=row_ok, other=0.0)
        delta = tl.load(Delta + zg * sdez + h * sdeh + offs_m * sdem, mask=row_ok, other=0.0)
        tdelta = tl.load(TDelta + z * stdez + h * stdeh + offs_m * stdem, mask=row_ok,
                         other=0.0)
        p, p_dot, ds, ds_dot = _bwd_jvp_tile(
            q, tq, do, tdo, lse, tlse, delta, tdelta, k, tk, v, tv, scale, offs_m, offs_n,
            Tq, Tk, mask_base, smm, smn, IS_CAUSAL, MASK_KIND, PREC, ACC)
        dv_dot += (tl.dot(tl.trans(p_dot.to(do.dtype)), do, input_precision=PREC).to(ACC)
                   + tl.dot(tl.trans(p.to(tdo.dtype)), tdo, input_precision=PREC).to(ACC))
        dk_dot += (tl.dot(tl.trans(ds_dot.to(q.dtype)), q, input_precision=PREC).to(ACC)
                   + tl.dot(tl.trans(ds.to(tq.dtype)), tq, input_precision=PREC).to(ACC))
    dk_dot = dk_dot * scale
    _store_rows(DK + z * sdkz + h * sdkh, offs_n, sdkn, sdkd, offs_d, Tk, D, dk_dot)
    _store_rows(DV_ + z * sdvz + h * sdvh, offs_n, sdvn, sdvd, offs_dv, Tk, DV, dv_dot)


@triton.jit
def _bwd_jvp_dq_kernel(
    Q, K, V, Mask, L, DO, Delta, TQ, TK, TV, TL, TDO, TDelta, DQ,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, slz, slh, slm, sdoz, sdoh, sdom, sdod, sdez, sdeh, sdem,
    stqz, stqh, stqm, stqd, stkz, stkh, stkn, stkd, stvz, stvh, stvn, stvd,
    stlz, stlh, stlm, stdoz, stdoh, stdom, stdod, stdez, stdeh, stdem,
    sdqz, sdqh, sdqm, sdqd,
    H, GROUP, Tq, Tk, D, DV, BP, BG, BMASK, scale_hi, scale_lo,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    scale = _full_scale(scale_hi, scale_lo, ACC)
    # Tangent of dQ = scale dS K for one query tile, over key tiles.
    pid_m = tl.program_id(0)
    z, h, hk = _program_heads(H, GROUP)
    zp = z % BP
    zg = z % BG
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Tq
    q = _rows(Q + zp * sqz + h * sqh, offs_m, sqm, sqd, offs_d, Tq, D)
    tq = _rows(TQ + z * stqz + h * stqh, offs_m, stqm, stqd, offs_d, Tq, D)
    do = _rows(DO + zg * sdoz + h * sdoh, offs_m, sdom, sdod, offs_dv, Tq, DV)
    tdo = _rows(TDO + z * stdoz + h * stdoh, offs_m, stdom, stdod, offs_dv, Tq, DV)
    lse = tl.load(L + zp * slz + h * slh + offs_m * slm, mask=row_ok, other=float("-inf"))
    tlse = tl.load(TL + z * stlz + h * stlh + offs_m * stlm, mask=row_ok, other=0.0)
    delta = tl.load(Delta + zg * sdez + h * sdeh + offs_m * sdem, mask=row_ok, other=0.0)
    tdelta = tl.load(TDelta + z * stdez + h * stdeh + offs_m * stdem, mask=row_ok, other=0.0)
    mask_base = Mask + (z % BMASK) * smz + h * smh
    dq_dot = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k = _rows(K + zp * skz + hk * skh, offs_n, skn, skd, offs_d, Tk, D)
        v = _rows(V + zp * svz + hk * svh, offs_n, svn, svd, offs_dv, Tk, DV)
        tk = _rows(TK + z * stkz + hk * stkh, offs_n, stkn, stkd, offs_d, Tk, D)
        tv = _rows(TV + z * stvz + hk * stvh, offs_n, stvn, stvd, offs_dv, Tk, DV)
        _p, _p_dot, ds, ds_dot = _bwd_jvp_tile(
            q, tq, do, tdo, lse, tlse, delta, tdelta, k, tk, v, tv, scale, offs_m, offs_n,
            Tq, Tk, mask_base, smm, smn, IS_CAUSAL, MASK_KIND, PREC, ACC)
        dq_dot += (tl.dot(ds_dot.to(k.dtype), k, input_precision=PREC).to(ACC)
                   + tl.dot(ds.to(tk.dtype), tk, input_precision=PREC).to(ACC))
    dq_dot = dq_dot * scale
    _store_rows(DQ + z * sdqz + h * sdqh, offs_m, sdqm, sdqd, offs_d, Tq, D, dq_dot)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype: torch.dtype) -> str:
    # "ieee" keeps float32 products exact to float32 (the default would use TF32).
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor, heads: int, tq: int, tk: int):
    """``(pointer, strides, batch size, kind)`` of a 4-D mask broadcast to ``heads`` heads
    by stride 0 (never expanded in memory).

    A boolean mask is read as the additive mask it equals (``0`` where it attends,
    ``-inf`` elsewhere, in ``like``'s dtype): the tiles of ``S`` are the same bit for bit,
    and the kernels then load only floating tiles. Triton failed to lower the forward
    kernel's ``uint8`` mask load in float64 on the H200 (the GPU test's bool-mask case).
    """
    if mask is None:
        return like, (0, 0, 0, 0), 1, MASK_NONE
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=like.dtype, device=mask.device).masked_fill_(
            ~mask, float("-inf"))
    m = mask.expand(mask.shape[0], heads, tq, tk)
    return m, m.stride(), m.shape[0], MASK_ADD


def _dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    heads, tq, d = q.shape[1], q.shape[2], q.shape[3]
    tk, dv = k.shape[2], v.shape[3]
    return heads, heads // k.shape[1], tq, tk, d, dv


def attention_forward(q, k, v, mask, is_causal: bool, scale: float,
                      config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, lse)`` for 4-D ``q (Z, H, Tq, D)``, ``k (Z, Hkv, Tk, D)``, ``v (Z, Hkv, Tk,
    DV)`` and an optional 4-D mask ``(Zm, 1 or H, Tq, Tk)`` (``Zm`` divides ``Z``)."""
    heads, group, tq, tk, d, dv = _dims(q, k, v)
    z = q.shape[0]
    o = torch.empty(z, heads, tq, dv, dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty(z, heads, tq, dtype=lse_dtype, device=q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    config = config or default_config(d, q.element_size(), backward=False)
    m, ms, bmask, kind = _mask_args(mask, q, heads, tq, tk)
    grid = (triton.cdiv(tq, config.block_m), z * heads)
    _fwd_kernel[grid](
        q, k, v, m, o, lse, *q.stride(), *k.stride(), *v.stride(), *ms, *o.stride(),
        *lse.stride(), heads, group, tq, tk, d, dv, bmask, *_scale_parts(scale),
        IS_CAUSAL=is_causal, MASK_KIND=kind, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_D=_p2(d), BLOCK_DV=_p2(dv), ACC=_acc(q.dtype),
        PREC=_prec(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o, lse


def _key_and_query_passes(dkdv_kernel, dq_kernel, q, k, v, mask, z: int, rows: tuple,
                          batches: tuple, is_causal: bool, scale: float, config: TileConfig):
    """Launches a backward-shaped pair of kernels, ``dkdv_kernel`` over key tiles and
    ``dq_kernel`` over query tiles, each tile with one writer; returns their ``(dQ, dK,
    dV)``-shaped outputs per query head for batch ``z``, in the accumulation dtype.
    ``rows`` are the tensors read beside ``q, k, v, mask``; ``batches`` the batch sizes the
    kernels read them at (``z`` modulo each)."""
    heads, group, tq, tk, d, dv_dim = _dims(q, k, v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty(z, heads, tq, d, dtype=acc, device=q.device)
    dk = torch.empty(z, heads, tk, d, dtype=acc, device=q.device)
    dv = torch.empty(z, heads, tk, dv_dim, dtype=acc, device=q.device)
    if z * heads == 0 or tq == 0 or tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    m, ms, bmask, kind = _mask_args(mask, q, heads, tq, tk)
    common = dict(IS_CAUSAL=is_causal, MASK_KIND=kind, BLOCK_M=config.block_m,
                  BLOCK_N=config.block_n, BLOCK_D=_p2(d), BLOCK_DV=_p2(dv_dim),
                  ACC=_acc(q.dtype), PREC=_prec(q.dtype), num_warps=config.num_warps,
                  num_stages=config.num_stages)
    inputs = (q, k, v, m, *rows)
    strides = (*q.stride(), *k.stride(), *v.stride(), *ms,
               *(x for t in rows for x in t.stride()))
    sizes = (heads, group, tq, tk, d, dv_dim, *batches, bmask, *_scale_parts(scale))
    dkdv_kernel[(triton.cdiv(tk, config.block_n), z * heads)](
        *inputs, dk, dv, *strides, *dk.stride(), *dv.stride(), *sizes, **common)
    dq_kernel[(triton.cdiv(tq, config.block_m), z * heads)](
        *inputs, dq, *strides, *dq.stride(), *sizes, **common)
    return dq, dk, dv


def attention_backward(q, k, v, mask, lse, do, delta, is_causal: bool, scale: float,
                       config: TileConfig | None = None):
    """``(dQ, dK, dV)`` per query head: ``dK, dV`` are ``(Z, H, Tk, .)`` (the caller sums
    GQA groups). ``do (Z, H, Tq, DV)`` and ``delta (Z, H, Tq)`` may have ``Z`` a multiple
    of the primals' batch (a folded block of cotangents)."""
    config = config or default_config(q.shape[-1], q.element_size(), backward=True)
    return _key_and_query_passes(_bwd_dkdv_kernel, _bwd_dq_kernel, q, k, v, mask,
                                 do.shape[0], (lse, do, delta), (q.shape[0],), is_causal,
                                 scale, config)


def attention_jvp(q, k, v, mask, o, lse, tq_, tk_, tv_, is_causal: bool, scale: float,
                  config: TileConfig | None = None):
    """``(Ȯ, l̇se)`` for tangents ``tq_, tk_, tv_`` (each ``None`` for zero) whose batch
    ``Z`` is a multiple of the primals' batch."""
    heads, group, tq, tk, d, dv = _dims(q, k, v)
    given = [t for t in (tq_, tk_, tv_) if t is not None]
    z, bp = given[0].shape[0], q.shape[0]
    dtype = torch.promote_types(q.dtype, given[0].dtype)
    out = torch.empty(z, heads, tq, dv, dtype=dtype, device=q.device)
    lse_dot = torch.empty(z, heads, tq, dtype=lse.dtype, device=q.device)
    if out.numel() == 0 or tk == 0:
        return out.zero_(), lse_dot.zero_()
    config = config or default_config(d, q.element_size(), backward=False)
    m, ms, bmask, kind = _mask_args(mask, q, heads, tq, tk)
    dummy = (q, (0, 0, 0, 0))

    def ptr(t):
        return (t, t.stride()) if t is not None else dummy

    (a, sa), (b, sb), (c, sc) = ptr(tq_), ptr(tk_), ptr(tv_)
    _jvp_kernel[(triton.cdiv(tq, config.block_m), z * heads)](
        q, k, v, m, o, lse, a, b, c, out, lse_dot,
        *q.stride(), *k.stride(), *v.stride(), *ms, *o.stride(), *lse.stride(),
        *sa, *sb, *sc, *out.stride(), *lse_dot.stride(),
        heads, group, tq, tk, d, dv, bp, bmask, *_scale_parts(scale),
        IS_CAUSAL=is_causal, MASK_KIND=kind, HAS_TQ=tq_ is not None,
        HAS_TK=tk_ is not None, HAS_TV=tv_ is not None, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_D=_p2(d), BLOCK_DV=_p2(dv), ACC=_acc(q.dtype),
        PREC=_prec(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse_dot


def attention_backward_jvp(q, k, v, mask, lse, do, delta, tq_, tk_, tv_, tlse, tdo, tdelta,
                           is_causal: bool, scale: float, config: TileConfig | None = None):
    """Tangents ``(dQ̇, dK̇, dV̇)`` of :func:`attention_backward`'s outputs, per query head
    like them (``dK̇, dV̇`` are ``(Z, H, Tk, .)``, the caller sums GQA groups), in the
    accumulation dtype.

    Primals ``q, k, v, lse`` have batch ``BP``; ``do, delta`` a multiple ``BG`` of it (a
    folded block of cotangents); every tangent (none may be ``None``) the batch ``Z`` of
    the outputs, a multiple of ``BG``. ``tlse`` is the tangent of ``lse`` and ``tdelta``
    that of ``delta``. Same tiles and passes as the backward: ``dK̇, dV̇`` over key
    tiles, ``dQ̇`` over query tiles, each tile of ``P`` and ``Ṗ`` recomputed from ``lse``.
    """
    config = config or backward_jvp_config(q.shape[-1], q.element_size())
    return _key_and_query_passes(
        _bwd_jvp_dkdv_kernel, _bwd_jvp_dq_kernel, q, k, v, mask, tq_.shape[0],
        (lse, do, delta, tq_, tk_, tv_, tlse, tdo, tdelta), (q.shape[0], do.shape[0]),
        is_causal, scale, config)


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))
