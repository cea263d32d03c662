"""KFAC and EKFAC cost against one gradient pass, torchcurv and curvlinops side by side.

Targets of issue 19: building the factors costs at most 1.5x one gradient pass over the
data, and a matvec and an inverse matvec at most 0.1x one gradient, for

- the benchmark MLP (784-512-512-10, 4 batches of 1024, cross-entropy), all layers;
- the GPT-2-style model (4 layers, d=256, vocab 50257, B=8, T=256) restricted to its
  linear layers: HF's ``Conv1D`` layers are converted to the ``nn.Linear`` they equal
  (KFAC supports ``nn.Linear`` and ``nn.Conv2d``), the causal-LM loss is
  ``CrossEntropyLoss`` on the ``(B (T-1), V)`` logit rows against the shifted tokens (as
  HF's own loss flattens them), so both libraries and the gradient get the same ``(X, y)``
  batches and the same loss layout. The classes-on-axis-1 layout ``(B, V, T-1)`` runs
  torch's cross-entropy through its strided ("spatial") kernels, slower than on rows for
  a 50257-class vocabulary; curvlinops flattens it to rows before its loss, torchcurv and
  a plain gradient do not, so that layout timed the loss's layout more than KFAC. One
  row, ``grad_classes_axis_1``, keeps that layout's gradient time for reference.

Per problem and library: ``grad`` (one gradient pass over all batches, the unit),
``build`` (KFAC factors; EKFAC factors + eigenvalue correction), ``matvec``,
``inverse_matvec`` (damped factors, and exact damping), each with ``ratio_to_grad``;
``eigh_factors`` times the eigendecompositions EKFAC and the inverses need, on the device
and on the host, to show which one EKFAC's build should use.
Builds run with ``check_deterministic=False`` in both libraries (torchcurv's checks walk
the data twice more; one extra row measures them) and are eager in both: curvlinops'
``compute_kronecker_factors()`` (and ``compute_eigenvalue_correction()``) is called inside
the timed build, so no product pays for factors. hessian-eigenthings has no KFAC.
Build rows also carry what one build dispatches (:func:`common.op_counts`: aten operators,
host syncs, CUDA launches): at these sizes a GPU waits on the host's issuing of operators.
``ops_*`` rows count the same for the gradient pass, each build and each product, per
library (``batches`` beside them; for the gradient and the KFAC builds also what one
more batch adds, ``*_per_batch``), so that host work per batch and per layer compares
without a GPU (``--quick`` on the CPU).
One JSON line per measurement, each with ``nparams``; a ``flop_floor`` row per problem
gives the FLOPs no implementation avoids (:func:`flop_floor`) and their ratios.

    python benchmarks/kfac.py --device cuda --out benchmarks/results/kfac_h200.jsonl
    python benchmarks/kfac.py --quick          # CPU smoke: tiny sizes, seconds
"""

from __future__ import annotations

import argparse

import torch
from common import (
    emit,
    gpt2_problem,
    guarded,
    machine,
    mlp_problem,
    op_counts,
    timed,
    write_to,
)
from torch import nn

import torchcurv

DAMPING = 1e-3


def built(fn, device) -> float:
    """Median seconds of a construction after one warm-up (first calls pay for lazy
    initialisation: kernels, allocator, imports)."""
    return timed(fn, device, reps=3, warmup=1)


def gradient_pass(model, criterion, data, params):
    def run():
        for x, y in data:
            torch.autograd.grad(criterion(model(x), y), params)
    return run


def conv1d_to_linear(module: nn.Module) -> nn.Module:
    """Replace HF ``Conv1D`` (``y = x W + b``, ``W`` of shape ``(in, out)``) by the equal
    ``nn.Linear`` (weight ``Wᵀ``), in place."""
    from transformers.pytorch_utils import Conv1D

    for name, child in list(module.named_children()):
        if isinstance(child, Conv1D):
            d_in, d_out = child.weight.shape
            linear = nn.Linear(d_in, d_out).to(child.weight.device, child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.T)
                linear.bias.copy_(child.bias)
            setattr(module, name, linear)
        else:
            conv1d_to_linear(child)
    return module


class NextTokenLogits(nn.Module):
    """``ids -> logits`` of the next tokens: ``(B (T-1), V)`` rows, or with
    ``classes_axis_1`` ``(B, V, T-1)`` (CE's class axis 1, its slow strided path)."""

    def __init__(self, lm: nn.Module, classes_axis_1: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.classes_axis_1 = classes_axis_1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids).logits[:, :-1]
        if self.classes_axis_1:
            return logits.transpose(1, 2)
        return logits.reshape(-1, logits.shape[-1])


def gpt2_linear_problem(device, small):
    lm, batches = gpt2_problem(device, small=small, num_batches=1)
    model = NextTokenLogits(conv1d_to_linear(lm)).eval()
    data = [(b["input_ids"], b["input_ids"][:, 1:].reshape(-1)) for b in batches]
    params = [p for m in model.modules() if isinstance(m, nn.Linear)
              for p in m.parameters() if p is not lm.lm_head.weight]
    return model, nn.CrossEntropyLoss(), data, params


def flop_floor(model, data, params) -> dict:
    """FLOPs that no implementation avoids, counted on the model's ``nn.Linear`` layers
    (rows ``R`` per layer: examples times shared positions, over all batches), of which
    those owning ``params`` are KFAC's:

    - gradient: the forward ``2 R d_in d_out`` and the input gradient (every layer but
      the first) ``2 R d_in d_out`` of every layer, plus the weight gradient
      ``2 R d_in d_out`` of KFAC's layers;
    - build: the same forward and backward to the layer outputs without the weight
      gradients, plus the factor products ``2 R (d_in² + d_out²)`` of KFAC's layers
      (``A = aᵀa / N``, ``B`` alike, one backpropagated vector);
    - matvec (and inverse matvec with damped factors): ``2 (d_out² d_in + d_out d_in²)``
      per KFAC layer, plus ``2 d_out²`` per bias block; the exact-damping inverse twice.

    Attention's matmuls, norms and the loss are left out (small here), so the ratios are
    what the FLOPs allow at equal efficiency, about.
    """
    owned = {id(p) for p in params}
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    rows: dict[int, int] = {}
    order: list[int] = []

    def count(module, args):
        rows[id(module)] = rows.get(id(module), 0) + args[0].numel() // args[0].shape[-1]
        if id(module) not in order:
            order.append(id(module))

    handles = [m.register_forward_pre_hook(count) for m in layers]
    try:
        with torch.no_grad():
            for x, _ in data:
                model(x)
    finally:
        for h in handles:
            h.remove()
    grad = build = matvec = 0.0
    for m in layers:
        r, d_in, d_out = rows.get(id(m), 0), m.in_features, m.out_features
        passes = (2 if order and order[0] == id(m) else 4) * r * d_in * d_out
        grad += passes
        build += passes
        if any(id(p) in owned for p in m.parameters()):
            grad += 2 * r * d_in * d_out
            build += 2 * r * (d_in ** 2 + d_out ** 2)
            matvec += 2 * (d_out ** 2 * d_in + d_out * d_in ** 2)
            matvec += 2 * d_out ** 2 if m.bias is not None else 0
    return dict(grad_flops=grad, build_flops=build, matvec_flops=matvec,
                build_floor_ratio=build / grad, matvec_floor_ratio=matvec / grad,
                exact_inverse_floor_ratio=2 * matvec / grad)


def bench(problem, model, criterion, data, params, device, reps):
    n = sum(p.numel() for p in params)
    emit(problem=problem, lib="floor", what="flop_floor", nparams=n,
         **flop_floor(model, data, params))
    t_grad = timed(gradient_pass(model, criterion, data, params), device, reps=reps)
    emit(problem=problem, lib="torch", what="grad", nparams=n, ms=t_grad * 1e3)

    def ops(lib, what, fn, **extra):
        emit(problem=problem, lib=lib, what=f"ops_{what}", nparams=n, batches=len(data),
             **op_counts(fn, device), **extra)

    def per_batch(make) -> dict:
        """What one more batch dispatches: ``make(batches)``'s counts over the data twice,
        less those over it once, per batch."""
        once, twice = op_counts(make(data), device), op_counts(make(data + data), device)
        return {f"{k}_per_batch": (twice[k] - once[k]) / len(data) for k in once}

    ops("torch", "grad", gradient_pass(model, criterion, data, params),
        **per_batch(lambda d: gradient_pass(model, criterion, d, params)))
    if isinstance(model, NextTokenLogits):
        strided = NextTokenLogits(model.lm, classes_axis_1=True)
        shaped = [(x, x[:, 1:]) for x, _ in data]
        t = timed(gradient_pass(strided, criterion, shaped, params), device, reps=reps)
        emit(problem=problem, lib="torch", what="grad_classes_axis_1", nparams=n,
             ms=t * 1e3, ratio_to_grad=t / t_grad)
    v = torch.randn(n, device=device)

    def row(lib, what, seconds, **extra):
        emit(problem=problem, lib=lib, what=what, nparams=n, ms=seconds * 1e3,
             ratio_to_grad=seconds / t_grad, **extra)

    def ours():
        settings = dict(params=params, fisher_type="mc", check_deterministic=False)
        def kfac():
            return torchcurv.KFACOperator(model, criterion, data, **settings)

        row("torchcurv", "build_kfac", built(kfac, device), **op_counts(kfac, device))
        ops("torchcurv", "build_kfac", kfac, **per_batch(
            lambda d: lambda: torchcurv.KFACOperator(model, criterion, d, **settings)))
        row("torchcurv", "build_kfac_with_checks", built(lambda: torchcurv.KFACOperator(
            model, criterion, data, params=params), device), check_deterministic=True)
        K = torchcurv.KFACOperator(model, criterion, data, **settings)
        row("torchcurv", "matvec_kfac", timed(lambda: K @ v, device, reps=reps))
        ops("torchcurv", "matvec_kfac", lambda: K @ v)
        # EKFAC's and the inverses' eigendecompositions alone, where they run and on the
        # host (a GPU's eigh of a few hundred rows is slow next to the pass over the data)
        factors = {id(t): t for f in K.factors
                   for t in (f.input_covariance, f.gradient_covariance) if t is not None}
        on_host = [t.cpu() for t in factors.values()]
        for where, mats in (("device", list(factors.values())), ("cpu", on_host)):
            row("torchcurv", "eigh_factors", built(
                lambda mats=mats: [torch.linalg.eigh(t) for t in mats], device),
                where=where, sizes=sorted(t.shape[0] for t in mats))
        inv = K.inverse(DAMPING)
        row("torchcurv", "inverse_matvec_kfac", timed(lambda: inv @ v, device, reps=reps),
            damping="factors")
        ops("torchcurv", "inverse_matvec_kfac", lambda: inv @ v, damping="factors")
        exact = K.inverse(DAMPING, mode="exact")
        row("torchcurv", "inverse_matvec_kfac", timed(lambda: exact @ v, device, reps=reps),
            damping="exact")
        ops("torchcurv", "inverse_matvec_kfac", lambda: exact @ v, damping="exact")
        def ekfac():
            return torchcurv.EKFACOperator(model, criterion, data, **settings)

        row("torchcurv", "build_ekfac", built(ekfac, device), **op_counts(ekfac, device))
        ops("torchcurv", "build_ekfac", ekfac)
        E = torchcurv.EKFACOperator(model, criterion, data, **settings)
        row("torchcurv", "matvec_ekfac", timed(lambda: E @ v, device, reps=reps))
        ops("torchcurv", "matvec_ekfac", lambda: E @ v)
        inv_e = E.inverse(DAMPING)
        row("torchcurv", "inverse_matvec_ekfac", timed(lambda: inv_e @ v, device, reps=reps),
            damping="exact")
        ops("torchcurv", "inverse_matvec_ekfac", lambda: inv_e @ v, damping="exact")

    def theirs():
        import curvlinops
        from curvlinops.inverse import KFACInverseLinearOperator

        def kfac(batches=data):
            K = curvlinops.KFACLinearOperator(model, criterion, params, batches,
                                              check_deterministic=False, seed=0)
            K.compute_kronecker_factors()
            return K

        row("curvlinops", "build_kfac", built(kfac, device), **op_counts(kfac, device))
        ops("curvlinops", "build_kfac", kfac, **per_batch(lambda d: lambda: kfac(d)))
        K = kfac()
        row("curvlinops", "matvec_kfac", timed(lambda: K @ v, device, reps=reps))
        ops("curvlinops", "matvec_kfac", lambda: K @ v)
        for mode, kw in (("factors", {}), ("exact", {"use_exact_damping": True})):
            inv = KFACInverseLinearOperator(K, damping=DAMPING, **kw)
            row("curvlinops", "inverse_matvec_kfac", timed(lambda inv=inv: inv @ v, device,
                                                           reps=reps), damping=mode)
            ops("curvlinops", "inverse_matvec_kfac", lambda inv=inv: inv @ v, damping=mode)

        def ekfac():
            E = curvlinops.EKFACLinearOperator(model, criterion, params, data,
                                               check_deterministic=False, seed=0)
            E.compute_kronecker_factors()
            E.compute_eigenvalue_correction()
            return E

        row("curvlinops", "build_ekfac", built(ekfac, device), **op_counts(ekfac, device))
        ops("curvlinops", "build_ekfac", ekfac)
        E = ekfac()
        row("curvlinops", "matvec_ekfac", timed(lambda: E @ v, device, reps=reps))
        ops("curvlinops", "matvec_ekfac", lambda: E @ v)
        inv = KFACInverseLinearOperator(E, damping=DAMPING, use_exact_damping=True)
        row("curvlinops", "inverse_matvec_ekfac", timed(lambda: inv @ v, device, reps=reps),
            damping="exact")
        ops("curvlinops", "inverse_matvec_ekfac", lambda: inv @ v, damping="exact")

    guarded(problem, "torchcurv", ours)
    guarded(problem, "curvlinops", theirs)
    emit(problem=problem, lib="hessian_eigenthings", nparams=n,
         skipped="hessian-eigenthings 1.0.0a5 has no KFAC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU, seconds")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["mlp", "gpt2"], default=None)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device("cpu" if args.quick else args.device)
    reps = 2 if args.quick else args.reps
    emit(what="machine", quick=args.quick, **machine(device))
    if args.only in (None, "mlp"):
        model, criterion, data = mlp_problem(device, small=args.quick)
        bench("mlp", model, criterion, data, list(model.parameters()), device, reps)
    if args.only in (None, "gpt2"):
        guarded("gpt2_linear", "setup", lambda: bench(
            "gpt2_linear", *gpt2_linear_problem(device, args.quick), device, reps))


if __name__ == "__main__":
    main()
