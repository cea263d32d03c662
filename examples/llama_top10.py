"""Top-10 eigenvalues of a 1.1B-parameter LLaMA's GGN and Hessian on one GPU.

The model is TinyLlama's shape (``LlamaConfig(hidden_size=2048, intermediate_size=5632,
num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)``, 1.1B parameters)
built from its config with random weights in bfloat16 (no download), on one batch of
2 x 2048 random tokens, with transformers' default SDPA attention. For each matrix,
thick-restart Lanczos (``torchcurv.eigsh(backend="lanczos")``) finds the top ``k``
eigenvalues; every eigenpair's true residual ``||A v - lambda v|| / |lambda||`` is
checked after the solve and printed with its verdict.

The products are exact by default: the GGN's JVP in forward mode (``jvp="forward"``)
and the Hessian as forward mode over the backward (``method="forward_over_reverse"``),
on CUDA both through torchcurv's Triton attention, so the ``(T, T)`` attention matrix is
never stored (double backward would need math SDPA's). ``--no-exact`` uses finite
differences of first-order passes instead (half the time per product), but in bfloat16
their relative error is of order 1e-1 (``benchmarks/product_accuracy.py``), far above
the residual check's ``1e-2``; the operators warn about it. The Krylov basis (``ncv``
vectors of ``n`` entries, 2 bytes each in bfloat16: 43 GiB for ``ncv = 21``) lives on the GPU;
``--basis-device cpu`` moves it to host memory (slower: it crosses PCIe every step).
``benchmarks/lm_billion.py`` measures this run on an H200, with what it costs.

Run: python examples/llama_top10.py                    # one CUDA GPU (an H200: 141 GB)
     python examples/llama_top10.py --tiny             # a tiny config on the CPU, seconds
     python examples/llama_top10.py --density top.png  # also an SLQ density of the Hessian
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

try:
    import transformers
except ImportError:
    # -c constraints.txt keeps the CPU torch: an unconstrained install may replace it
    raise SystemExit("this example needs transformers; from the checkout: "
                     "python3 -m pip install -c constraints.txt -e '.[hf]'") from None

import torchcurv

SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=32),
}
TOKENS = {"1.1b": (2, 2048), "tiny": (2, 8)}  # (sequences, tokens per sequence)
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-6}
"""A bfloat16 product carries about 1e-2 relative rounding: no tighter residual can be
certified in bfloat16 (docs/language-models.md, "Mixed precision"). LLaMA's RMSNorm
computes in float32 whatever the model's dtype, so a float64 LLaMA's curvature is
symmetric only to about 1e-7."""


def build(size: str, device: torch.device, dtype: torch.dtype):
    """The random-weight model (built directly on ``device`` in ``dtype``) and its one
    batch of random tokens, both seeded."""
    config = transformers.LlamaConfig(**SHAPES[size], max_position_embeddings=TOKENS[size][1],
                                      use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of the weights first
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(before)
    ids = torch.randint(0, config.vocab_size, TOKENS[size],
                        generator=torch.Generator().manual_seed(0)).to(device)
    return model, [{"input_ids": ids, "labels": ids}]


def curvature(matrix: str, model, data, exact: bool):
    objective = torchcurv.causal_lm_objective()
    if matrix == "ggn":
        return torchcurv.GGNOperator(model, objective, data,
                                     jvp="forward" if exact else "finite_difference")
    return torchcurv.HessianOperator(
        model, objective, data, method="forward_over_reverse" if exact else "finite_difference")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true",
                    help="a 1-layer model of 3376 parameters on the CPU, float64, exact")
    ap.add_argument("--matrix", nargs="+", default=["ggn", "hessian"],
                    choices=["ggn", "hessian"])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ncv", type=int, default=21, help="Lanczos basis size (2k + 1)")
    ap.add_argument("--maxiter", type=int, default=40, help="most thick restarts")
    ap.add_argument("--tol", type=float, default=None,
                    help="relative residual (default 1e-2 in bfloat16, 1e-6 in float64)")
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                    help="exact products (default); --no-exact: finite differences")
    ap.add_argument("--basis-device", default=None, help="where the Krylov basis lives")
    ap.add_argument("--density", default=None, help="write the Hessian's SLQ density here")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    size = "tiny" if args.tiny else "1.1b"
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("llama_top10.py needs a CUDA GPU for the 1.1B model (its Krylov basis "
                 "alone is 43 GiB); run with --tiny for a tiny model on the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float64 if args.tiny else torch.bfloat16
    exact = args.exact
    tol = TOL[dtype] if args.tol is None else args.tol
    model, data = build(size, device, dtype)
    n = sum(p.numel() for p in model.parameters())
    itemsize = torch.finfo(dtype).bits // 8
    print(f"LLaMA {size}: n = {n:,} parameters, {dtype}, {data[0]['input_ids'].numel()} "
          f"tokens; Krylov basis {args.ncv} x n = {args.ncv * n * itemsize / 2**30:.3g} GiB")

    results = {}
    for matrix in args.matrix:
        op = curvature(matrix, model, data, exact)
        res = torchcurv.eigsh(op, k=args.k, which="LA", backend="lanczos", tol=tol, seed=0,
                              ncv=args.ncv, maxiter=args.maxiter,
                              basis_device=args.basis_device,
                              # eigenvalues and true residuals only: the check then forms
                              # one Ritz vector at a time (all k beside the basis and a
                              # Hessian product do not fit on one H200)
                              return_eigenvectors=False)
        values = res.eigenvalues.flip(0)  # largest first
        relative = (res.residuals / res.eigenvalues.abs()).flip(0)
        how = op.derivative.name if hasattr(op, "derivative") else ""
        print(f"\n{matrix} ({how}): {res.num_matvecs} products, {res.wall_time:.1f} s, "
              f"stopped: {res.info.stop_reason}")
        for lam, r, ok in zip(values.tolist(), relative.tolist(), res.converged.flip(0)):
            print(f"  {lam: .6e}   residual {r:.1e}   {'converged' if ok else 'NOT converged'}")
        results[matrix] = {"method": how, "eigenvalues": values.tolist(),
                           "relative_residuals": relative.tolist(),
                           "converged": res.converged.flip(0).tolist(), "tol": tol,
                           "num_matvecs": res.num_matvecs, "seconds": res.wall_time}
        if matrix == "hessian" and args.density:
            density = torchcurv.spectral_density(op, num_probes=2, lanczos_steps=24, seed=0,
                                                 probes_per_matmat=1)
            density.plot(args.density, eigenvalues=res.eigenvalues,
                         model=f"LLaMA {size} (random init) Hessian")
            print(f"  SLQ density: {args.density}")
        del op, res

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "n": n, "dtype": str(dtype), **results}, f, indent=1)
    done = all(all(r["converged"]) for r in results.values())
    print("\nevery eigenpair converged" if done else "\nsome eigenpairs did not converge")


if __name__ == "__main__":
    main()
