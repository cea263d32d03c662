"""GGN-product cost against one gradient: torchcurv (each jvp method) beside its peers.

For the MLP (784-512-512-10 tanh, 4 x 1024) and a 4-layer GPT-2-style model (B=8, T=256,
vocabulary 50257): gradient time over the data, one GGN matvec, and matmat(16) per vector,
for torchcurv's ``GGNOperator`` (``jvp="forward" | "double_vjp" | "finite_difference"``),
hessian-eigenthings' ``GGNOperator`` and curvlinops' ``GGNLinearOperator`` (MLP) when
installed. Target on an H100: GGN matvec <= 3x one gradient on the GPT-2-style model
(hessian-eigenthings measured 5.3x with 5.4 GiB peak).

    python benchmarks/ggn_products.py --device cuda --out ggn.jsonl
    python benchmarks/ggn_products.py --device cpu --small      # seconds, smoke
"""

from __future__ import annotations

import torch
from common import (
    emit,
    gpt2_problem,
    guarded,
    measure_products,
    mlp_problem,
    peak_gib,
    products_main,
    timed,
)
from torch import nn

import torchcurv

JVPS = ("forward", "double_vjp", "finite_difference")


def lm_ggn_objective(vocab: int) -> torchcurv.Objective:
    """Causal-LM next-token CE with the logits as the GGN's output (closed-form CE Hessian)."""
    criterion = nn.CrossEntropyLoss()

    def targets(batch):
        return batch["labels"][:, 1:].reshape(-1)

    return torchcurv.Objective(
        forward=lambda model, batch: model(input_ids=batch["input_ids"]).logits[:, :-1]
        .reshape(-1, vocab),
        loss=lambda logits, batch: criterion(logits, targets(batch)),
        weight=lambda batch: (targets(batch) != -100).sum(),
        criterion=criterion,
        targets=targets,
    )


def bench_mlp(device, small, reps):
    model, criterion, data = mlp_problem(device, small)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for x, y in data:
            torch.autograd.grad(criterion(model(x), y), params)

    t_grad = timed(grad, device, reps=reps)
    emit(problem="mlp", what="gradient", ms=t_grad * 1e3, peak_gib=peak_gib(device, grad))
    for jvp in JVPS:
        G = torchcurv.GGNOperator(model, criterion, data, jvp=jvp)
        guarded("mlp", "torchcurv", lambda G=G, jvp=jvp: measure_products(
            "mlp", "torchcurv", f"ggn/{jvp}", G.matvec, G.matmat, G.n, device, t_grad, reps))

    def eigenthings():
        import hessian_eigenthings as he

        Gh = he.GGNOperator(model, data, lambda m, b: m(b[0]),
                            he.supervised_loss_of_output(criterion))
        measure_products("mlp", "hessian_eigenthings", "ggn", Gh.matvec, None, Gh.size, device,
                         t_grad, reps)

    def curvlinops():
        import curvlinops

        Gc = curvlinops.GGNLinearOperator(model, criterion, params, data)
        n = sum(p.numel() for p in params)
        measure_products("mlp", "curvlinops", "ggn", lambda v: Gc @ v, lambda V: Gc @ V, n, device,
                         t_grad, reps)

    guarded("mlp", "hessian_eigenthings", eigenthings)
    guarded("mlp", "curvlinops", curvlinops)


def bench_gpt2(device, small, reps, attn):
    model, batches = gpt2_problem(device, small, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.config.vocab_size

    def grad():
        for b in batches:
            torch.autograd.grad(model(**b).loss, params)

    t_grad = timed(grad, device, reps=reps)
    emit(problem="gpt2", attn=attn, what="gradient", ms=t_grad * 1e3,
         nparams=sum(p.numel() for p in params), peak_gib=peak_gib(device, grad))
    for jvp in JVPS:
        def ours(jvp=jvp):
            G = torchcurv.GGNOperator(model, lm_ggn_objective(vocab), batches, jvp=jvp)
            measure_products("gpt2", "torchcurv", f"ggn/{jvp}/{attn}", G.matvec, G.matmat, G.n,
                             device, t_grad, reps)

        guarded("gpt2", "torchcurv", ours)

    def eigenthings():
        import hessian_eigenthings as he

        Gh = he.GGNOperator(model, batches, he.hf_lm_forward(), he.hf_lm_loss_of_output())
        measure_products("gpt2", "hessian_eigenthings", f"ggn/{attn}", Gh.matvec, None, Gh.size,
                         device, t_grad, reps)

    guarded("gpt2", "hessian_eigenthings", eigenthings)


if __name__ == "__main__":
    products_main(__doc__, bench_mlp, bench_gpt2)
