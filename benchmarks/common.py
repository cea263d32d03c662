"""Shared setup for the benchmarks: timing, the two reference problems, JSON output."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchcurv.operators.base import LinearOperator

_OUT: list[Path] = []


def emit(**record) -> None:
    """Print one JSON line (and append it to the file given by ``--out``)."""
    line = json.dumps(record, default=str)
    print(line, flush=True)
    for path in _OUT:
        with path.open("a") as f:
            f.write(line + "\n")


def write_to(path: str | None) -> None:
    if path:
        _OUT.append(Path(path))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds, synchronised with the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def op_counts(fn: Callable[[], object], device: torch.device) -> dict:
    """What one call of ``fn`` dispatches, after a warm-up call: aten operators (every
    ``aten::`` event, nested ones included), host syncs (the reads of tensor values on
    the host that :class:`~torchcurv.operators.counting.HostReads` counts: ``.item()``,
    ``float(t)``, ``bool(t)``, ``torch.equal``, ``.tolist()``; from a further call) and,
    on CUDA, kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    # here, not at the top: engine_ab.py imports this module beside older torchcurv trees
    from torchcurv.operators.counting import HostReads

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    fn()
    sync(device)
    with profile(activities=activities) as p:
        fn()
        sync(device)
    events = p.key_averages()
    with HostReads() as reads:
        fn()
        sync(device)
    counts = dict(aten_ops=sum(e.count for e in events if e.key.startswith("aten::")),
                  host_syncs=reads.count)
    if device.type == "cuda":
        counts["launches"] = sum(e.count for e in events if e.key in (
            "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return counts


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "python": sys.version.split()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["threads"] = torch.get_num_threads()
    return info


def mlp_problem(device: torch.device, small: bool = False, dtype=torch.float32):
    """The MLP 784-512-512-10 (tanh) with 4 batches of 1024 (``small``: 64-32-32-10, 4x64)."""
    torch.manual_seed(0)
    d_in, width, batch = (64, 32, 64) if small else (784, 512, 1024)
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 10),
    ).to(device, dtype)
    data = [
        (torch.randn(batch, d_in, device=device, dtype=dtype),
         torch.randint(0, 10, (batch,), device=device))
        for _ in range(4)
    ]
    return model, nn.CrossEntropyLoss(), data


def gpt2_problem(device: torch.device, small: bool = False, attn: str = "eager",
                 num_batches: int = 1):
    """A 4-layer GPT-2-style model from a config (vocab 50257, B=8, T=256), random weights.

    Returns ``(model, batches)`` with ``num_batches`` HF dict batches
    ``{"input_ids", "labels"}`` (the first is the same for every ``num_batches``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    n_layer, d, vocab, B, T = (2, 32, 500, 2, 32) if small else (4, 256, 50257, 8, 256)
    cfg = GPT2Config(n_layer=n_layer, n_head=4, n_embd=d, vocab_size=vocab, n_positions=T,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = attn
    model = GPT2LMHeadModel(cfg).to(device).eval()
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(0, vocab, (B, T), device=device)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def lm_objective():
    """HF causal-LM loss (``model(**batch).loss``) weighted by its number of predicted tokens."""
    import torchcurv

    return torchcurv.Objective.from_loss_fn(
        lambda model, batch: model(**batch).loss,
        weight=lambda batch: (batch["labels"][:, 1:] != -100).sum(),
    )


class TimedOperator(LinearOperator):
    """Delegates to ``inner`` and adds up the device-synchronised seconds of its products,
    so a solver's wall time splits into products and everything else."""

    def __init__(self, inner: LinearOperator) -> None:
        super().__init__(inner.n, inner.dtype, inner.device)
        self.inner = inner
        self.seconds = 0.0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.inner.matmat(V)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def peak_gib(device, fn) -> float | None:
    """Peak CUDA memory (GiB) while ``fn`` runs; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure_products(problem, lib, method, op_matvec, op_matmat, n, device, t_grad, reps):
    """Emit one product's time, ratio to the gradient and peak; then a block of 16."""
    v = torch.randn(n, device=device)
    t = timed(lambda: op_matvec(v), device, reps=reps)
    rec = dict(problem=problem, lib=lib, method=method, what="hvp", nparams=n, ms=t * 1e3,
               ratio_to_grad=t / t_grad, peak_gib=peak_gib(device, lambda: op_matvec(v)))
    emit(**rec)
    if op_matmat is not None:
        V = torch.randn(n, 16, device=device)
        t16 = timed(lambda: op_matmat(V), device, reps=max(2, reps // 2), warmup=1)
        emit(problem=problem, lib=lib, method=method, what="matmat16", nparams=n, ms=t16 * 1e3,
             ms_per_vec=t16 * 1e3 / 16, ratio_per_vec_to_grad=t16 / 16 / t_grad,
             peak_gib=peak_gib(device, lambda: op_matmat(V)))


def guarded(problem, lib, fn, **context):
    """Run ``fn``; an exception becomes an ``error`` record (a failing peer is a finding)
    carrying ``context`` (e.g. ``what``, ``nparams``) beside the error."""
    try:
        fn()
    except Exception as exc:  # a peer failing is a finding, not the end of the run
        emit(problem=problem, lib=lib, **context, error=repr(exc)[:400],
             where=traceback.format_exc().splitlines()[-3][:200])


def products_main(doc: str, bench_mlp, bench_gpt2) -> None:
    """The command line shared by the product benchmarks: ``--device --small --reps
    --only --out``; the MLP, then the GPT-2-style model with eager and sdpa attention."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["mlp", "gpt2"], default=None)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device(args.device)
    emit(what="machine", **machine(device))
    if args.only in (None, "mlp"):
        bench_mlp(device, args.small, args.reps)
    if args.only in (None, "gpt2"):
        for attn in ("eager", "sdpa"):
            guarded("gpt2", "setup", lambda attn=attn: bench_gpt2(device, args.small,
                                                                  args.reps, attn))
