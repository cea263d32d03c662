"""Triton kernels for flash-style attention and its first derivatives (spec: math SDPA).

Three passes, each tiled over ``(BLOCK_M query rows) x (BLOCK_N keys)`` so that no
``(T, T)`` matrix exists outside a tile. ``S = scale Q Kᵀ + mask``, ``P = softmax(S)``:

* forward: ``O = P V`` by the online softmax; it keeps ``lse = log sum_j exp S_ij`` per
  row, which lets the other passes form any tile of ``P`` exactly as ``exp(S - lse)``;
* backward (two kernels, so that each output tile has one writer and no atomics):
  ``dS = P ∘ (dO Vᵀ - delta)`` with ``delta = rowsum(dO ∘ O) - g_lse``; ``dV = Pᵀ dO`` and
  ``dK = scale dSᵀ Q`` over key tiles, ``dQ = scale dS K`` over query tiles;
* JVP: with ``Ṡ = scale (Q̇ Kᵀ + Q K̇ᵀ)``, ``Ȯ = P (Ṡ ∘ ...) `` written out per row as
  ``Ȯ_i = sum_j P_ij (Ṡ_ij V_j + V̇_j) - r_i O_i`` and ``l̇se_i = r_i = sum_j P_ij Ṡ_ij``.

Batches: a program works on batch ``z`` of the pass's outputs; primal inputs (``Q, K, V,
O, lse``) are read at ``z % BP`` and the mask at ``z % BMASK``. A vmapped block of
tangents (or cotangents) is folded into the batch axis, ``z = vector * B + b``, and reads
the one copy of the primals without expanding them. GQA: query head ``h`` reads key/value
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

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


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
        if MASK_KIND == 1:
            valid = valid & (tl.load(at, mask=inside, other=0) != 0)
        else:
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
    H, GROUP, Tq, Tk, D, DV, BMASK, scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // H).to(tl.int64)
    h = zh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Tq
    q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + z * skz + hk * skh
    v_base = V + z * svz + hk * svh
    mask_base = Mask + (z % BMASK) * smz + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        col_ok = offs_n < Tk
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
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
    tl.store(O + z * soz + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(L + z * slz + h * slh + offs_m * slm, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Mask, L, DO, Delta, DK, DV_,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, slz, slh, slm, sdoz, sdoh, sdom, sdod, sdez, sdeh, sdem,
    sdkz, sdkh, sdkn, sdkd, sdvz, sdvh, sdvn, sdvd,
    H, GROUP, Tq, Tk, D, DV, BP, BMASK, scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // H).to(tl.int64)
    zp = z % BP
    h = zh % H
    hk = h // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_m = tl.arange(0, BLOCK_M)
    col_ok = offs_n < Tk
    k = tl.load(K + zp * skz + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + zp * svz + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    q_base = Q + zp * sqz + h * sqh
    do_base = DO + z * sdoz + h * sdoh
    mask_base = Mask + (z % BMASK) * smz + h * smh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    for start_m in range(lo, Tq, BLOCK_M):
        offs_m = start_m + arange_m
        row_ok = offs_m < Tq
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
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
    tl.store(DK + z * sdkz + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + z * sdvz + h * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Mask, L, DO, Delta, DQ,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, slz, slh, slm, sdoz, sdoh, sdom, sdod, sdez, sdeh, sdem,
    sdqz, sdqh, sdqm, sdqd,
    H, GROUP, Tq, Tk, D, DV, BP, BMASK, scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // H).to(tl.int64)
    zp = z % BP
    h = zh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Tq
    q = tl.load(Q + zp * sqz + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + z * sdoz + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(L + zp * slz + h * slh + offs_m * slm, mask=row_ok, other=float("-inf"))
    delta = tl.load(Delta + z * sdez + h * sdeh + offs_m * sdem, mask=row_ok, other=0.0)
    k_base = K + zp * skz + hk * skh
    v_base = V + zp * svz + hk * svh
    mask_base = Mask + (z % BMASK) * smz + h * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        col_ok = offs_n < Tk
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = _scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_base, smm, smn,
                    IS_CAUSAL, MASK_KIND, PREC, ACC)
        p = _probabilities(s, lse)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(ACC)
    dq = dq * scale
    tl.store(DQ + z * sdqz + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _jvp_kernel(
    Q, K, V, Mask, O, L, TQ, TK, TV, TO, TL,
    sqz, sqh, sqm, sqd, skz, skh, skn, skd, svz, svh, svn, svd,
    smz, smh, smm, smn, soz, soh, som, sod, slz, slh, slm,
    stqz, stqh, stqm, stqd, stkz, stkh, stkn, stkd, stvz, stvh, stvn, stvd,
    stoz, stoh, stom, stod, stlz, stlh, stlm,
    H, GROUP, Tq, Tk, D, DV, BP, BMASK, scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TQ: tl.constexpr,
    HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // H).to(tl.int64)
    zp = z % BP
    h = zh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Tq
    qd_ok = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + zp * sqz + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=qd_ok, other=0.0)
    if HAS_TQ:
        tq = tl.load(TQ + z * stqz + h * stqh + offs_m[:, None] * stqm + offs_d[None, :] * stqd,
                     mask=qd_ok, other=0.0)
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
        col_ok = offs_n < Tk
        kd_ok = col_ok[:, None] & (offs_d[None, :] < D)
        vd_ok = col_ok[:, None] & (offs_dv[None, :] < DV)
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kd_ok,
                    other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=vd_ok,
                    other=0.0)
        s = _scores(q, k, scale, offs_m, offs_n, Tq, Tk, mask_base, smm, smn,
                    IS_CAUSAL, MASK_KIND, PREC, ACC)
        p = _probabilities(s, lse)
        if HAS_TQ or HAS_TK:
            ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            if HAS_TQ:
                ds += tl.dot(tq, tl.trans(k.to(tq.dtype)), input_precision=PREC).to(ACC)
            if HAS_TK:
                tk = tl.load(tk_base + offs_n[:, None] * stkn + offs_d[None, :] * stkd,
                             mask=kd_ok, other=0.0)
                ds += tl.dot(q.to(tk.dtype), tl.trans(tk), input_precision=PREC).to(ACC)
            pds = p * (ds * scale)
            r += tl.sum(pds, axis=1)
            acc += tl.dot(pds.to(v.dtype), v, input_precision=PREC).to(ACC)
        if HAS_TV:
            tv = tl.load(tv_base + offs_n[:, None] * stvn + offs_dv[None, :] * stvd,
                         mask=vd_ok, other=0.0)
            acc += tl.dot(p.to(tv.dtype), tv, input_precision=PREC).to(ACC)
    od_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(O + zp * soz + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                mask=od_ok, other=0.0).to(ACC)
    out = acc - r[:, None] * o
    tl.store(TO + z * stoz + h * stoh + offs_m[:, None] * stom + offs_dv[None, :] * stod,
             out.to(TO.dtype.element_ty), mask=od_ok)
    tl.store(TL + z * stlz + h * stlh + offs_m * stlm, r, mask=row_ok)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype: torch.dtype) -> str:
    # "ieee" keeps float32 products exact to float32 (the default would use TF32).
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor, heads: int, tq: int, tk: int):
    """``(pointer, strides, batch size, kind)`` of a 4-D mask broadcast to ``heads`` heads
    by stride 0 (never copied)."""
    if mask is None:
        return like, (0, 0, 0, 0), 1, MASK_NONE
    m = mask.expand(mask.shape[0], heads, tq, tk)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
        kind = MASK_BOOL
    else:
        kind = MASK_ADD
    return m, m.stride(), m.shape[0], kind


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
        *lse.stride(), heads, group, tq, tk, d, dv, bmask, scale,
        IS_CAUSAL=is_causal, MASK_KIND=kind, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_D=_p2(d), BLOCK_DV=_p2(dv), ACC=_acc(q.dtype),
        PREC=_prec(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o, lse


def attention_backward(q, k, v, mask, lse, do, delta, is_causal: bool, scale: float,
                       config: TileConfig | None = None):
    """``(dQ, dK, dV)`` per query head: ``dK, dV`` are ``(Z, H, Tk, .)`` (the caller sums
    GQA groups). ``do (Z, H, Tq, DV)`` and ``delta (Z, H, Tq)`` may have ``Z`` a multiple
    of the primals' batch (a folded block of cotangents)."""
    heads, group, tq, tk, d, dv_dim = _dims(q, k, v)
    z, bp = do.shape[0], q.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty(z, heads, tq, d, dtype=acc, device=q.device)
    dk = torch.empty(z, heads, tk, d, dtype=acc, device=q.device)
    dv = torch.empty(z, heads, tk, dv_dim, dtype=acc, device=q.device)
    if z * heads == 0 or tq == 0 or tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    config = config or default_config(d, q.element_size(), backward=True)
    m, ms, bmask, kind = _mask_args(mask, q, heads, tq, tk)
    common = dict(IS_CAUSAL=is_causal, MASK_KIND=kind, BLOCK_M=config.block_m,
                  BLOCK_N=config.block_n, BLOCK_D=_p2(d), BLOCK_DV=_p2(dv_dim),
                  ACC=_acc(q.dtype), PREC=_prec(q.dtype), num_warps=config.num_warps,
                  num_stages=config.num_stages)
    strides = (*q.stride(), *k.stride(), *v.stride(), *ms, *lse.stride(), *do.stride(),
               *delta.stride())
    sizes = (heads, group, tq, tk, d, dv_dim, bp, bmask, scale)
    _bwd_dkdv_kernel[(triton.cdiv(tk, config.block_n), z * heads)](
        q, k, v, m, lse, do, delta, dk, dv, *strides, *dk.stride(), *dv.stride(), *sizes,
        **common)
    _bwd_dq_kernel[(triton.cdiv(tq, config.block_m), z * heads)](
        q, k, v, m, lse, do, delta, dq, *strides, *dq.stride(), *sizes, **common)
    return dq, dk, dv


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
        heads, group, tq, tk, d, dv, bp, bmask, scale,
        IS_CAUSAL=is_causal, MASK_KIND=kind, HAS_TQ=tq_ is not None,
        HAS_TK=tk_ is not None, HAS_TV=tv_ is not None, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_D=_p2(d), BLOCK_DV=_p2(dv), ACC=_acc(q.dtype),
        PREC=_prec(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse_dot


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))
