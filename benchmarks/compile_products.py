"""Curvature products with ``compile=True`` against eager, on the two reference problems.

For the MLP (784-512-512-10 tanh, 4 x 1024) and the 4-layer GPT-2-style model (B=8,
T=256, vocabulary 50257; eager and sdpa attention; the next-token loss computed from the
logits, as ``benchmarks/ggn_products.py`` does): the gradient over the data, then for
every compiled path (``HessianOperator(method="forward_over_reverse")``,
``HessianOperator(method="finite_difference")``, ``GGNOperator(jvp="forward")``) the
first compiled matvec and matmat(16) (their compile included, reported apart), the
median eager and compiled matvec and matmat(16) times, their ratios to the gradient, the
peak memory, and the largest relative difference of a compiled column from its eager
one. Every row carries ``nparams``. This decides where ``compile=True`` wins.

    python benchmarks/compile_products.py --tag h200               # CUDA, inductor
    python benchmarks/compile_products.py --quick                  # CPU smoke, aot_eager

Rows are appended to ``benchmarks/results/compile_products_<tag>.jsonl`` (or ``--out``).
``--backend`` sets the torch.compile backend through torchcurv's internal hook
(``--quick`` on a CPU defaults to ``aot_eager``: inductor's C++ build takes tens of
seconds per graph there).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import (
    emit,
    gpt2_problem,
    guarded,
    machine,
    mlp_problem,
    peak_gib,
    sync,
    timed,
    write_to,
)
from ggn_products import lm_ggn_objective

import torchcurv
from torchcurv.derivatives import base

# (label, operator, keywords): every path compile=True has
PATHS = (
    ("hessian/forward_over_reverse", torchcurv.HessianOperator,
     {"method": "forward_over_reverse"}),
    ("hessian/finite_difference", torchcurv.HessianOperator, {"method": "finite_difference"}),
    ("ggn/forward", torchcurv.GGNOperator, {"jvp": "forward"}),
)
BLOCK = 16


def once(fn, device) -> float:
    """Seconds of one synchronised call (a first call: its compile included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def max_column_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``||a_j - b_j|| / ||b_j||`` over the columns, in float64."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    return float(((a - b).norm(dim=0) / b.norm(dim=0).clamp_min(1e-300)).max())


def bench_path(problem, label, make, device, t_grad, reps, **context):
    """One path's rows: eager, the first compiled calls, compiled, and their difference."""
    eager, compiled = make(False), make(True)
    n = eager.n
    g = torch.Generator(device).manual_seed(0)
    v = torch.randn(n, device=device, dtype=eager.dtype, generator=g)
    V = torch.randn(n, BLOCK, device=device, dtype=eager.dtype, generator=g)
    row = dict(problem=problem, path=label, nparams=n, dtype=str(eager.dtype), **context)
    # first compiled calls before any eager product: their times are the compile's
    first_matvec = once(lambda: compiled.matvec(v), device)
    first_matmat = once(lambda: compiled.matmat(V), device)
    emit(**row, what="first_call", matvec_s=first_matvec, matmat16_s=first_matmat)
    for mode, op in (("eager", eager), ("compiled", compiled)):
        t = timed(lambda op=op: op.matvec(v), device, reps=reps)
        t16 = timed(lambda op=op: op.matmat(V), device, reps=max(2, reps // 2), warmup=1)
        emit(**row, what=mode, matvec_ms=t * 1e3, ratio_to_grad=t / t_grad,
             matmat16_ms_per_vec=t16 * 1e3 / BLOCK, ratio_per_vec_to_grad=t16 / BLOCK / t_grad,
             peak_gib=peak_gib(device, lambda op=op: op.matvec(v)),
             peak16_gib=peak_gib(device, lambda op=op: op.matmat(V)))
    emit(**row, what="difference",
         matvec_max_rel=max_column_rel(compiled.matvec(v)[:, None], eager.matvec(v)[:, None]),
         matmat16_max_rel=max_column_rel(compiled.matmat(V), eager.matmat(V)))


def bench_mlp(device, small, reps):
    model, criterion, data = mlp_problem(device, small)
    params = [p for p in model.parameters() if p.requires_grad]
    nparams = sum(p.numel() for p in params)

    def grad():
        for x, y in data:
            torch.autograd.grad(criterion(model(x), y), params)

    t_grad = timed(grad, device, reps=reps)
    emit(problem="mlp", what="gradient", ms=t_grad * 1e3, nparams=nparams)
    for label, cls, options in PATHS:
        guarded("mlp", "torchcurv", lambda label=label, cls=cls, options=options: bench_path(
            "mlp", label, lambda c: cls(model, criterion, data, compile=c, **options),
            device, t_grad, reps), path=label, nparams=nparams)


def bench_gpt2(device, small, reps, attn):
    model, batches = gpt2_problem(device, small, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    nparams = sum(p.numel() for p in params)
    vocab = model.config.vocab_size

    def grad():
        for b in batches:
            torch.autograd.grad(model(**b).loss, params)

    t_grad = timed(grad, device, reps=reps)
    emit(problem="gpt2", attn=attn, what="gradient", ms=t_grad * 1e3, nparams=nparams)
    # The next-token loss from the logits for every path: HF's model(**batch).loss calls
    # logger.warning_once, which dynamo does not trace (a CompileFailedError).
    objective = lm_ggn_objective(vocab)
    for label, cls, options in PATHS:
        guarded("gpt2", "torchcurv", lambda label=label, cls=cls, options=options: bench_path(
            "gpt2", label, lambda c: cls(model, objective, batches, compile=c, **options),
            device, t_grad, reps, attn=attn), path=label, attn=attn, nparams=nparams)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps: a CPU smoke run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["mlp", "gpt2"], default=None)
    ap.add_argument("--attn", choices=["eager", "sdpa"], nargs="+", default=["eager", "sdpa"],
                    help="the GPT-2-style model's attention implementations")
    ap.add_argument("--backend", default=None,
                    help="torch.compile backend (default inductor; aot_eager for --quick on a CPU)")
    ap.add_argument("--tag", default=None, help="results file suffix (default: quick / device)")
    ap.add_argument("--out", default=None, help="write the JSON lines here instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    reps = 2 if args.quick else args.reps
    backend = args.backend or ("aot_eager" if args.quick and device.type == "cpu" else "inductor")
    base._COMPILE_BACKEND = backend
    tag = args.tag or ("quick" if args.quick else device.type)
    out = (Path(args.out) if args.out else
           Path(__file__).resolve().parent / "results" / f"compile_products_{tag}.jsonl")
    write_to(str(out))  # appended to: several calls (--only, --attn) may share one file
    emit(what="machine", backend=backend, quick=args.quick, **machine(device))
    if args.only in (None, "mlp"):
        bench_mlp(device, args.quick, reps)
    if args.only in (None, "gpt2"):
        for attn in args.attn:
            guarded("gpt2", "setup", lambda attn=attn: bench_gpt2(device, args.quick, reps, attn),
                    attn=attn)


if __name__ == "__main__":
    main()
