"""Curvature-product cost against one gradient, torchcurv beside its peers, in one run.

For the MLP (784-512-512-10 tanh, 4 x 1024) and a 4-layer GPT-2-style model (B=8, T=256):
gradient time over the data, single HVP time, matmat(16) time per vector, for torchcurv
(each HVP method), hessian-eigenthings and curvlinops when installed. Every ratio is
against the gradient measured in the same run.

    python benchmarks/curvature_products.py --device cuda --out results.jsonl
    python benchmarks/curvature_products.py --device cpu --small      # seconds, smoke
"""

from __future__ import annotations

import torch
from common import (
    emit,
    gpt2_problem,
    guarded,
    lm_objective,
    measure_products,
    mlp_problem,
    peak_gib,
    products_main,
    timed,
)

import torchcurv


def budget_rows(problem, method, op, device, t_grad, step_peak_gib, reps, factor=4.0,
                cpu_share=0.7):
    """The block of 16 under ``max_memory`` = ``factor`` training steps' peak (minus what is
    allocated already: the budget counts above it), per-vector cost and peak, and the
    split the planner chose (``op.block_plan``: microbatches with the whole block, or
    column sub-blocks); and ``memory_estimate`` against the measured peaks of 1 and 16
    vectors. Off CUDA (no training-step peak to read) the budget is ``cpu_share`` of
    the predicted peak of the block, so that the smoke run plans a split too."""
    n = op.n
    V = torch.randn(n, 16, device=device, dtype=op.dtype)
    estimate = op.memory_estimate(16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        budget = int(factor * step_peak_gib * 2**30 - base)
    else:
        base, budget, factor = 0, int(cpu_share * estimate.bytes), None
    if budget <= 0:
        emit(problem=problem, lib="torchcurv", method=method, what="matmat16_budget",
             nparams=n, skipped=f"{factor} training steps are below what is allocated")
        return
    whole = op.replace(max_memory=None)  # one product per block, measured as it is
    for m in (1, 16):
        block = V[:, :m].contiguous()
        measured = peak_gib(device, lambda block=block: whole.matmat(block))
        emit(problem=problem, lib="torchcurv", method=method, what="memory_estimate", m=m,
             nparams=n, predicted_gib=(base + estimate.at(m).bytes) / 2**30,
             measured_peak_gib=measured,
             ratio=None if measured is None else (base + estimate.at(m).bytes) / 2**30 / measured)
    B = op.replace(max_memory=budget)
    # the warm-up product measures the peaks; the timed ones run the plan
    t16 = timed(lambda: B.matmat(V), device, reps=max(2, reps // 2), warmup=1)
    plan = B.block_plan
    emit(problem=problem, lib="torchcurv", method=method, what="matmat16_budget", nparams=n,
         budget_gib=budget / 2**30, budget_steps=factor, batch_splitting=B.batch_splitting,
         split=None if plan is None else plan.split,
         sub_block=None if plan is None else plan.vectors,
         microbatch_size=None if plan is None else plan.microbatch_size,
         predicted_gib=None if plan is None else (base + plan.predicted_bytes) / 2**30,
         ms=t16 * 1e3, ratio_per_vec_to_grad=t16 / 16 / t_grad,
         peak_gib=peak_gib(device, lambda: B.matmat(V)), step_peak_gib=step_peak_gib)


def graphed_gradient_ms(grad, params, device, reps):
    """One gradient over the data recorded as a CUDA graph and replayed: the floor that
    products recorded with ``cuda_graphs=True`` compare with (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            grad()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grad()
    return timed(graph.replay, device, reps=reps) * 1e3


def graph_rows(problem, method, build, device, t_grad, t_grad_graphed, reps):
    """``cuda_graphs=True`` products: one vector and a block of 16, against the eager
    and the recorded gradient."""
    if device.type != "cuda":
        return
    op = build()
    v = torch.randn(op.n, device=device)
    V = torch.randn(op.n, 16, device=device)
    t = timed(lambda: op.matvec(v), device, reps=reps)
    t16 = timed(lambda: op.matmat(V), device, reps=max(2, reps // 2), warmup=1)
    emit(problem=problem, lib="torchcurv", method=f"{method}+cuda_graphs", what="hvp",
         nparams=op.n, ms=t * 1e3, ratio_to_grad=t / t_grad,
         ratio_to_graphed_grad=t * 1e3 / t_grad_graphed,
         peak_gib=peak_gib(device, lambda: op.matvec(v)))
    emit(problem=problem, lib="torchcurv", method=f"{method}+cuda_graphs", what="matmat16",
         nparams=op.n, ms=t16 * 1e3, ratio_per_vec_to_grad=t16 / 16 / t_grad,
         ratio_per_vec_to_graphed_grad=t16 * 1e3 / 16 / t_grad_graphed,
         peak_gib=peak_gib(device, lambda: op.matmat(V)))


def bench_mlp(device, small, reps):
    model, criterion, data = mlp_problem(device, small)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for x, y in data:
            torch.autograd.grad(criterion(model(x), y), params)

    t_grad = timed(grad, device, reps=reps)
    step_peak = peak_gib(device, grad)
    emit(problem="mlp", what="gradient", ms=t_grad * 1e3, peak_gib=step_peak,
         nparams=sum(p.numel() for p in params))
    for method in ("autograd", "forward_over_reverse"):
        H = torchcurv.HessianOperator(model, criterion, data, method=method)
        guarded("mlp", "torchcurv", lambda H=H, method=method: measure_products(
            "mlp", "torchcurv", method, H.matvec, H.matmat, H.n, device, t_grad, reps))
        guarded("mlp", "torchcurv", lambda H=H, method=method: budget_rows(
            "mlp", method, H, device, t_grad, step_peak, reps))
    t_graphed = graphed_gradient_ms(grad, params, device, reps)
    if t_graphed is not None:
        emit(problem="mlp", what="gradient_cuda_graph", ms=t_graphed,
             nparams=sum(p.numel() for p in params), ratio_to_grad=t_graphed / 1e3 / t_grad)
        for method in ("autograd", "forward_over_reverse"):
            guarded("mlp", "torchcurv", lambda method=method: graph_rows(
                "mlp", method, lambda: torchcurv.HessianOperator(
                    model, criterion, data, method=method, cuda_graphs=True),
                device, t_grad, t_graphed, reps))
        guarded("mlp", "torchcurv", lambda: graph_rows(
            "mlp", "ggn/forward", lambda: torchcurv.GGNOperator(
                model, criterion, data, cuda_graphs=True), device, t_grad, t_graphed, reps))
    G = torchcurv.GGNOperator(model, criterion, data)
    guarded("mlp", "torchcurv", lambda: measure_products(
        "mlp", "torchcurv", "ggn/forward", G.matvec, G.matmat, G.n, device, t_grad, reps))
    guarded("mlp", "torchcurv", lambda: budget_rows(
        "mlp", "ggn/forward", G, device, t_grad, step_peak, reps))

    def eigenthings():
        import hessian_eigenthings as he

        Hh = he.HessianOperator(model, data, he.supervised_loss(criterion))
        measure_products("mlp", "hessian_eigenthings", "hvp", Hh.matvec, None, Hh.size, device,
                         t_grad, reps)

    def curvlinops():
        import curvlinops

        Hc = curvlinops.HessianLinearOperator(model, criterion, params, data)
        n = sum(p.numel() for p in params)
        measure_products("mlp", "curvlinops", "hvp", lambda v: Hc @ v, lambda V: Hc @ V, n, device,
                         t_grad, reps)

    guarded("mlp", "hessian_eigenthings", eigenthings)
    guarded("mlp", "curvlinops", curvlinops)


def bench_gpt2(device, small, reps, attn):
    model, batches = gpt2_problem(device, small, attn)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for b in batches:
            torch.autograd.grad(model(**b).loss, params)

    t_grad = timed(grad, device, reps=reps)
    step_peak = peak_gib(device, grad)
    emit(problem="gpt2", attn=attn, what="gradient", ms=t_grad * 1e3,
         nparams=sum(p.numel() for p in params), peak_gib=step_peak)
    for method in ("autograd", "forward_over_reverse"):
        def ours(method=method):
            H = torchcurv.HessianOperator(model, lm_objective(), batches, method=method)
            measure_products("gpt2", "torchcurv", f"{method}/{attn}", H.matvec, H.matmat, H.n,
                             device, t_grad, reps)
            budget_rows("gpt2", f"{method}/{attn}", H, device, t_grad, step_peak, reps)

        guarded("gpt2", "torchcurv", ours)

    def ggn():
        from torchcurv.models import causal_lm_objective

        G = torchcurv.GGNOperator(model, causal_lm_objective(), batches)
        measure_products("gpt2", "torchcurv", f"ggn/forward/{attn}", G.matvec, G.matmat, G.n,
                         device, t_grad, reps)
        budget_rows("gpt2", f"ggn/forward/{attn}", G, device, t_grad, step_peak, reps)

    guarded("gpt2", "torchcurv", ggn)

    def graphed():
        t_graphed = graphed_gradient_ms(grad, params, device, reps)
        if t_graphed is None:
            return
        emit(problem="gpt2", attn=attn, what="gradient_cuda_graph", ms=t_graphed,
             nparams=sum(p.numel() for p in params), ratio_to_grad=t_graphed / 1e3 / t_grad)
        guarded("gpt2", "torchcurv", lambda: graph_rows(
            "gpt2", f"autograd/{attn}", lambda: torchcurv.HessianOperator(
                model, lm_objective(), batches, cuda_graphs=True), device, t_grad, t_graphed,
            reps))

    guarded("gpt2", "torchcurv", graphed)

    def eigenthings():
        import hessian_eigenthings as he

        Hh = he.HessianOperator(model, batches, he.hf_lm_loss())
        measure_products("gpt2", "hessian_eigenthings", f"hvp/{attn}", Hh.matvec, None, Hh.size,
                         device, t_grad, reps)

    guarded("gpt2", "hessian_eigenthings", eigenthings)


if __name__ == "__main__":
    products_main(__doc__, bench_mlp, bench_gpt2)
