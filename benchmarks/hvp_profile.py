"""Where the time of one Hessian-vector product goes, against a gradient, a bare double
backward and hessian-eigenthings, interleaved in one run.

Every measured function runs once per round, ``--rounds`` rounds, and the median is
reported: on a machine whose speed drifts (a busy host, GPU clocks) interleaving keeps the
ratios comparable. Rows: the gradient; a bare double backward (``torch.autograd.grad``
twice, no checks); hessian-eigenthings' ``matvec``; torchcurv's walk over the data
(``_walk_batches``), its product without the input checks (``_matmat``) and ``matvec``; the
model guard alone; the engine's own time (the walk with every batch product computed
beforehand, and ``matvec`` with the whole walk computed beforehand); on CUDA also
``cuda_graphs=True``. Each row carries ``nparams`` and,
from one profiled call, the number of aten operators (and CUDA kernel launches).

    python benchmarks/hvp_profile.py --device cuda --out benchmarks/results/hvp_profile_h200.jsonl
    python benchmarks/hvp_profile.py --device cpu   # the small MLP and GPT-2 config, 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import (
    emit,
    gpt2_problem,
    lm_objective,
    machine,
    mlp_problem,
    op_counts,
    sync,
    write_to,
)
from torch import nn

import torchcurv
from torchcurv.operators.model_guard import preserved


def interleaved(fns: list[tuple[str, object]], device: torch.device, rounds: int) -> dict:
    for _, f in fns:
        f(), f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k, _ in fns}
    for _ in range(rounds):
        for k, f in fns:
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def problem(name: str, device: torch.device):
    """``(model, objective, data, loss_of_batch, hessian-eigenthings loss)``; on the CPU
    the small MLP (784-32-32-10, 4 x 256) and the small GPT-2 config."""
    import hessian_eigenthings as he

    if name == "mlp":
        if device.type == "cpu":
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                  nn.Linear(32, 10))
            data = [(torch.randn(256, 784), torch.randint(0, 10, (256,))) for _ in range(4)]
            criterion = nn.CrossEntropyLoss()
        else:
            model, criterion, data = mlp_problem(device, False)
        return (model, criterion, data, lambda b: criterion(model(b[0]), b[1]),
                he.supervised_loss(criterion))
    model, data = gpt2_problem(device, device.type == "cpu", "eager")
    return model, lm_objective(), data, lambda b: model(**b).loss, he.hf_lm_loss()


def bench(name: str, device: torch.device, rounds: int) -> None:
    import hessian_eigenthings as he

    model, objective, data, loss_of, he_loss = problem(name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    H = torchcurv.HessianOperator(model, objective, data)
    Hh = he.HessianOperator(model, data, he_loss)
    v = torch.randn(n, device=device)
    V = v[:, None]
    vs = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]
    scale = 1.0 / len(data)

    def gradient():
        for b in data:
            torch.autograd.grad(loss_of(b), params)

    def bare_double_backward():
        total = torch.zeros(n, device=device)
        for b in data:
            g = torch.autograd.grad(loss_of(b) * scale, params, create_graph=True)
            hv = torch.autograd.grad(g, params, grad_outputs=vs)
            total.add_(torch.cat([h.reshape(-1) for h in hv]))

    def guard():  # as products run it: with the operator's guard, which keeps the layout
        with preserved(model, guard=H._guard):
            pass

    # The engine without autograd: the walk over the data with each batch's product
    # replaced by one computed beforehand, and everything outside the walk (input
    # checks, attention restriction, sharding, loss check) with the walk replaced too.
    blocks = H._split_block(V)
    answers = [H.derivative.batch_matmat(H, b, s, blocks) for _, b, s in H._batches()]
    turn = iter(range(1 << 62))
    walked = H._walk_batches(V, lambda op, b, s, blk: answers[next(turn) % len(answers)])

    def walk_without_products():
        H._walk_batches(V, lambda op, b, s, blk: answers[next(turn) % len(answers)])

    def matvec_without_walk():
        H._walk_batches = lambda V, batch_matmat, enter=None: walked  # type: ignore
        try:
            H.matvec(v)
        finally:
            del H._walk_batches

    fns = [("gradient", gradient), ("bare_double_backward", bare_double_backward),
           ("hessian_eigenthings_matvec", lambda: Hh.matvec(v)),
           ("torchcurv_walk", lambda: H._walk_batches(V, H.derivative.batch_matmat)),
           ("torchcurv_local_matmat", lambda: H._local_matmat(V)),
           ("torchcurv_matmat_unchecked", lambda: H._matmat(V)),
           ("torchcurv_matvec", lambda: H.matvec(v)), ("model_guard", guard),
           ("engine_walk_without_products", walk_without_products),
           ("engine_matvec_without_walk", matvec_without_walk)]
    if device.type == "cuda":
        try:
            Hg = torchcurv.HessianOperator(model, objective, data, cuda_graphs=True)
            for _ in range(3):
                Hg.matvec(v)
            fns.append(("torchcurv_matvec_cuda_graphs", lambda: Hg.matvec(v)))
        except RuntimeError as exc:
            emit(problem=name, nparams=n, what="torchcurv_matvec_cuda_graphs",
                 error=repr(exc)[:300])
    t = interleaved(fns, device, rounds)
    for k, f in fns:
        row = dict(problem=name, nparams=n, what=k, ms=t[k] * 1e3,
                   ratio_to_grad=t[k] / t["gradient"], rounds=rounds)
        if k not in ("model_guard", "engine_walk_without_products",
                     "engine_matvec_without_walk"):
            row.update(op_counts(f, device))
        emit(**row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--only", choices=["mlp", "gpt2"], default=None)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    emit(what="machine", **machine(device))
    for name in ("mlp", "gpt2"):
        if args.only in (None, name):
            bench(name, device, args.rounds)


if __name__ == "__main__":
    main()
