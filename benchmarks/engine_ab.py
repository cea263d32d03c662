"""Two torchcurv trees side by side on the 1.1B LLaMA's products: time, peak, and where
the GPU time goes.

Each tree runs in its own process (a fresh import of that tree's ``torchcurv``), in the
order given, so ``old new old new`` alternates them and shows the spread between
processes of one tree beside the difference between trees. Per product and tree: the
median of ``--reps`` timed products after one warm-up, the peak above what was allocated
before it, and (``--profile``) the ten kernels and the ten host operators with the most
self time in one profiled product.

An earlier engine as a tree, without touching the checkout:

    mkdir -p .ab/old && git archive 7a1acad torchcurv | tar -x -C .ab/old
    python benchmarks/engine_ab.py .ab/old . .ab/old . --profile \
        --out benchmarks/results/engine_ab_h200.jsonl
    python benchmarks/engine_ab.py .ab/old . --quick      # tiny LLaMA on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PRODUCTS = {
    "hessian/finite_difference": ("HessianOperator", {"method": "finite_difference"}),
    "hessian/forward_over_reverse": ("HessianOperator", {"method": "forward_over_reverse"}),
    "ggn/forward": ("GGNOperator", {"jvp": "forward"}),
}


def child(tree: str, quick: bool, reps: int, profile: bool) -> None:
    """Runs in the subprocess: ``tree``'s torchcurv first on the path."""
    sys.path.insert(0, os.path.abspath(tree))
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(1, here)
    import torch
    from common import emit, timed
    from lm_billion import LLAMA, QUICK_LLAMA, QUICK_VOCAB, VOCAB, llama, nparams, token_batches

    import torchcurv

    device = torch.device("cpu" if quick else "cuda")
    shape, vocab = (QUICK_LLAMA, QUICK_VOCAB) if quick else (LLAMA, VOCAB)
    seq = 32 if quick else 2048
    dtype = torch.float32 if quick else torch.bfloat16
    model = llama(shape["1.1b"], vocab, device, dtype, seq)
    batches = token_batches(vocab, 2, seq, device)
    context = dict(tree=tree, file=torchcurv.__file__, model="llama-1.1b",
                   nparams=nparams(model), dtype=str(dtype).removeprefix("torch."),
                   tokens=2 * seq)
    for name, (cls, kw) in PRODUCTS.items():
        op = getattr(torchcurv, cls)(model, torchcurv.causal_lm_objective(), batches, **kw)
        v = torch.randn(op.n, device=device, dtype=op.dtype)
        seconds = timed(lambda op=op, v=v: op @ v, device, reps=reps, warmup=1)
        row = dict(context, what=name, seconds=seconds)
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            op @ v
            torch.cuda.synchronize()
            row.update(resident_gib=base / 2**30,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            with profiler(activities=activities) as prof:
                op @ v
                if device.type == "cuda":
                    torch.cuda.synchronize()
            events = prof.key_averages()
            row["host_top"] = [[e.key, e.count, e.self_cpu_time_total / 1e3] for e in
                               sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]]
            if device.type == "cuda":
                row["gpu_top"] = [[e.key, e.count, e.self_device_time_total / 1e3] for e in
                                  sorted(events, key=lambda e: -e.self_device_time_total)[:10]]
        emit(**row)
        del op, v
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", help="torchcurv trees (folders holding torchcurv/)")
    ap.add_argument("--quick", action="store_true", help="tiny LLaMA on the CPU")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.quick, args.reps, args.profile)
        return
    for tree in args.trees:
        cmd = [sys.executable, __file__, tree, "--child", tree, "--reps", str(args.reps)]
        cmd += ["--quick"] * args.quick + ["--profile"] * args.profile
        done = subprocess.run(cmd, capture_output=True, text=True)
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
        if done.returncode:
            row = {"tree": tree, "error": done.stderr.strip().splitlines()[-1:]}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
