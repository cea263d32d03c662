"""The two splits of a block over ``max_memory``, side by side: microbatches with the whole
block (the planner's choice where the model allows it) against sub-blocks of columns on
whole batches (the same operator with batch splitting switched off), and unbudgeted.

An activation-bound MLP (32-256-10 tanh, 4 batches of 2048): ``matmat`` of 16 under a
budget of ``--share`` of the block's predicted unbudgeted peak; per-vector time against
one gradient over the data (best of ``--rounds`` interleaved rounds), the plan, its
predicted and measured peak (:class:`~torchcurv.operators.memory.PeakMeter`) and the aten
operators of one call.

    python benchmarks/budget_split.py --device cpu --out results.jsonl
"""

from __future__ import annotations

import argparse
import time

import torch
from common import emit, machine, op_counts, sync, write_to
from torch import nn

import torchcurv
from torchcurv.operators.memory import PeakMeter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--share", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device(args.device)
    emit(what="machine", **machine(device))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 10)).to(device)
    data = [(torch.randn(2048, 32, device=device), torch.randint(0, 10, (2048,), device=device))
            for _ in range(4)]
    criterion = nn.CrossEntropyLoss()
    params = list(model.parameters())

    def grad() -> None:
        for x, y in data:
            torch.autograd.grad(criterion(model(x), y), params)

    builds = {
        "forward_over_reverse": lambda **k: torchcurv.HessianOperator(
            model, criterion, data, method="forward_over_reverse", **k),
        "autograd": lambda **k: torchcurv.HessianOperator(model, criterion, data, **k),
        "ggn/forward": lambda **k: torchcurv.GGNOperator(model, criterion, data, **k),
    }
    for method, build in builds.items():
        whole = build(max_memory=None)
        V = torch.randn(whole.n, 16, device=device)
        budget = int(args.share * whole.memory_estimate(16).bytes)
        planned = build(max_memory=budget)
        columns = build(max_memory=budget)
        columns._splits_batches = False  # the same operator, in column sub-blocks
        for op in (planned, columns):
            op.matmat(V)  # measures the peaks
            op.matmat(V)  # the first product in the plan's microbatches counts them
        variants = {"unbudgeted": whole, "planned": planned, "columns": columns}
        peaks = {}
        for name, op in variants.items():
            with PeakMeter(device) as meter:
                op.matmat(V)
            peaks[name] = meter.peak
        times: dict[str, list[float]] = {name: [] for name in (*variants, "gradient")}
        fns = {"gradient": grad} | {name: (lambda op=op, V=V: op.matmat(V))
                                    for name, op in variants.items()}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
        t_grad = min(times["gradient"])
        for name, op in variants.items():
            plan = op.block_plan
            emit(what="matmat16_budget_split", method=method, variant=name, nparams=op.n,
                 budget_bytes=budget if op is not whole else None, share=args.share,
                 split=None if plan is None else plan.split,
                 sub_block=None if plan is None else plan.vectors,
                 microbatch_size=None if plan is None else plan.microbatch_size,
                 predicted_bytes=None if plan is None else plan.predicted_bytes,
                 measured_peak_bytes=peaks[name],
                 ratio_per_vec_to_grad=min(times[name]) / 16 / t_grad,
                 aten_ops=op_counts(lambda op=op, V=V: op.matmat(V), device)["aten_ops"])


if __name__ == "__main__":
    main()
