"""Attention alone: the Triton kernel against math SDPA and the fused SDPA, per derivative.

For ``B=2, H=32`` query heads (4 KV heads, GQA), ``T=2048``, ``D=64``, causal, in bfloat16
and float32: time and peak memory of

* ``forward``: ``O = attention(q, k, v)`` without autograd;
* ``gradient``: forward and backward of ``sum(O * w)`` (``torch.autograd.grad``);
* ``jvp``: ``torch.func.jvp`` of the attention (the GGN's ``jvp="forward"``);
* ``hvp``: ``torch.func.jvp(torch.func.grad(sum(O * w)))``, forward over reverse (the
  exact Hessian's ``method="forward_over_reverse"``), and ``hvp_vmap4`` the same vmapped
  over 4 tangents (one product block);

for ``triton`` (:func:`torchcurv.kernels.flash_attention.flash_attention`), ``math``
(SDPA's math backend, the ``(T, T)`` matrices) and ``fused`` (SDPA's default backends;
``forward`` and ``gradient`` only, it has no forward-mode rule). Every row carries the
shapes; ``ratio_to_gradient`` is the row's time per vector over the same implementation's
``gradient``. The issue's targets at 1.1B parameters, T = 2048: exact HVP <= 3x a
gradient, GGN <= 2.5x. A self-check first compares every derivative of the kernel with
math SDPA in float32 and prints the largest relative error.

    python benchmarks/attention_products.py            # CUDA, all rows
    python benchmarks/attention_products.py --quick    # CPU, Triton interpreter, tiny

Writes JSON lines to ``benchmarks/results/attention_products_<tag>.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--quick" in sys.argv:
    # Triton reads this at import, so it is set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from common import emit, guarded, machine, peak_gib, timed, write_to
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from torchcurv.kernels.flash_attention import flash_attention
from torchcurv.kernels.flash_attention_triton import TileConfig

RESULTS = Path(__file__).resolve().parent / "results"


def _math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa(q, k, v, **kw)


IMPLS = {"triton": flash_attention, "math": _math, "fused": sdpa}
# The fused SDPA kernels have no forward-mode rule and no double backward.
FIRST_ORDER_ONLY = {"fused"}


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    B, H, Hkv, T, D = (shape[k] for k in ("B", "H", "Hkv", "T", "D"))

    def randn(*size):
        return torch.randn(*size, generator=g, device=device, dtype=dtype)

    primals = (randn(B, H, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, D))
    tangents = tuple(randn(*p.shape) for p in primals)
    return primals, tangents, randn(B, H, T, D)


def _products(attention, shape: dict, primals, tangents, w):
    """The measured calls of one implementation, by name."""
    kw = dict(is_causal=shape["causal"], enable_gqa=shape["H"] != shape["Hkv"])

    def attn(q, k, v):
        return attention(q, k, v, **kw)

    def loss(q, k, v):
        return (attn(q, k, v) * w).sum()

    grad = torch.func.grad(loss, argnums=(0, 1, 2))

    def forward():
        with torch.no_grad():
            return attn(*primals)

    def gradient():
        leaves = tuple(p.detach().requires_grad_() for p in primals)
        return torch.autograd.grad(loss(*leaves), leaves)

    def hvp_block():
        block = tuple(torch.stack([t] * 4) for t in tangents)
        return torch.func.vmap(lambda *t: torch.func.jvp(grad, primals, t)[1])(*block)

    return {"forward": forward, "gradient": gradient,
            "jvp": lambda: torch.func.jvp(attn, primals, tangents),
            "hvp": lambda: torch.func.jvp(grad, primals, tangents), "hvp_vmap4": hvp_block}


def self_check(shape: dict, device: torch.device) -> None:
    """Relative max error of every measured derivative, kernel against math SDPA, float32."""
    primals, tangents, w = _inputs(shape, torch.float32, device, seed=1)
    got = _products(flash_attention, shape, primals, tangents, w)
    want = _products(_math, shape, primals, tangents, w)
    errors = {}
    for what in got:
        a, b = torch.utils._pytree.tree_leaves(got[what]()), \
            torch.utils._pytree.tree_leaves(want[what]())
        errors[what] = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))
    emit(what="self_check", dtype="float32", **shape, max_rel_error=errors,
         worst=max(errors.values()))
    print(f"self-check (float32 vs math SDPA): worst relative error {max(errors.values()):.2e}",
          file=sys.stderr)


def bench(shape: dict, dtype: torch.dtype, device: torch.device, reps: int) -> None:
    primals, tangents, w = _inputs(shape, dtype, device)
    base = (torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    for impl, attention in IMPLS.items():
        if device.type != "cuda" and impl == "fused":
            continue  # the fused CUDA kernels are what this row is about
        calls = _products(attention, shape, primals, tangents, w)
        t_grad = None
        for what, fn in calls.items():
            if impl in FIRST_ORDER_ONLY and what not in ("forward", "gradient"):
                continue
            vectors = 4 if what == "hvp_vmap4" else 1
            row = dict(what=what, impl=impl, dtype=str(dtype).removeprefix("torch."),
                       vectors=vectors, **shape)

            def measure(fn=fn, row=row, what=what, vectors=vectors):
                nonlocal t_grad
                t = timed(fn, device, reps=reps, warmup=1)
                if what == "gradient":
                    t_grad = t
                emit(**row, ms=t * 1e3, ms_per_vector=t * 1e3 / vectors,
                     ratio_to_gradient=None if t_grad is None else t / vectors / t_grad,
                     peak_gib=peak_gib(device, fn), inputs_gib=base)

            guarded("attention", impl, measure, **row)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def sweep(shape: dict, dtype: torch.dtype, device: torch.device, reps: int,
          configs: list) -> None:
    """The JVP-of-backward kernels alone (``attention_backward_jvp``, both passes) under
    each tile configuration, to choose its default (it keeps twice the backward's tiles
    live per program, so the backward's tiles need not suit it)."""
    from torchcurv.kernels import flash_attention_triton as kernels
    from torchcurv.kernels.flash_attention import _delta, _rowdot

    (q, k, v), (tq, tk, tv), do = _inputs(shape, dtype, device)
    scale = shape["D"] ** -0.5
    o, lse = kernels.attention_forward(q, k, v, None, shape["causal"], scale)
    to, tlse = kernels.attention_jvp(q, k, v, None, o, lse, tq, tk, tv, shape["causal"], scale)
    delta = _delta(do, o, None)
    tdelta = _rowdot(do, o) + _rowdot(do, to)  # with dO's tangent taken as dO
    reference = kernels.attention_backward_jvp(q, k, v, None, lse, do, delta, tq, tk, tv, tlse,
                                               do, tdelta, shape["causal"], scale)
    for config in configs:
        row = dict(what="backward_jvp_kernels", impl="triton",
                   dtype=str(dtype).removeprefix("torch."), block_m=config.block_m,
                   block_n=config.block_n, num_warps=config.num_warps,
                   num_stages=config.num_stages, **shape)

        def fn(config=config):
            return kernels.attention_backward_jvp(q, k, v, None, lse, do, delta, tq, tk, tv,
                                                  tlse, do, tdelta, shape["causal"], scale,
                                                  config)

        def measure(fn=fn, row=row):
            # A tiling that changes the result beyond rounding is a bug, not a timing.
            diff = max(float((x - y).abs().max() / y.abs().max())
                       for x, y in zip(fn(), reference))
            emit(**row, ms=timed(fn, device, reps=reps, warmup=1) * 1e3,
                 peak_gib=peak_gib(device, fn), max_rel_diff_to_default=diff)

        guarded("attention", "triton", measure, **row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: Triton interpreter, tiny shapes, float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--tag", default=None, help="results file suffix (default: h200, quick)")
    ap.add_argument("--results", default=str(RESULTS), help="folder of the results file")
    args = ap.parse_args()
    device = torch.device("cpu" if args.quick else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --quick for the CPU smoke run")
    tag = args.tag or ("quick" if args.quick else "h200")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    out = Path(args.results) / f"attention_products_{tag}.jsonl"
    out.unlink(missing_ok=True)
    write_to(str(out))
    emit(what="machine", **machine(device))
    if args.quick:
        shape = dict(B=1, H=2, Hkv=1, T=24, D=16, causal=True)
        self_check(shape, device)
        bench(shape, torch.float32, device, reps=1)
        sweep(shape, torch.float32, device, 1, [TileConfig(16, 16), TileConfig(16, 32)])
        return
    self_check(dict(B=1, H=8, Hkv=2, T=512, D=64, causal=True), device)
    shape = dict(B=2, H=32, Hkv=4, T=args.T, D=64, causal=True)
    for dtype in (torch.bfloat16, torch.float32):
        bench(shape, dtype, device, args.reps)
    configs = [TileConfig(m, n, warps, stages) for m in (32, 64, 128) for n in (32, 64)
               for warps in (4, 8) for stages in (1, 2)]
    for dtype in (torch.bfloat16, torch.float32):
        sweep(shape, dtype, device, args.reps, configs)


if __name__ == "__main__":
    main()
