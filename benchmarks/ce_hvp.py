"""Microbenchmark of the cross-entropy loss-Hessian product on one CUDA device.

In one run: the device-to-device copy bandwidth, then each backend (eager, compile,
triton) for float32 and bfloat16 at N=8192, V=50304 with one direction, and with a block
of M=16 directions sharing the softmax of N=1024 rows (16384 direction rows: twice the
direction bytes of the first case, so the block fits eager's temporaries on an 80 GB
card). For each: a correctness check against float64 on a slice of rows (with a
NaN-poisoned output, so unwritten elements fail); the median device time per call
(``time_ms``: host launch latency hidden), the synchronous latency of a call on an idle
device (``call_ms``: with it) and the host's time to launch it (``host_ms``); the
effective bandwidth over the bytes that must move (logits read + U read + output
written, once each) in device time, its fraction of the copy bandwidth, and the extra
peak memory of a call beyond its inputs (output included). One JSON object per line on
stdout, a table last.

    PYTHONPATH=. python3 benchmarks/ce_hvp.py [--out results.jsonl] [--no-block] [--sweep]

``--sweep`` also times the Triton kernel over a grid of launch configurations (chunk,
block_m, num_warps, maxnreg) per case, the evidence behind ``default_config``.

Targets (issue 6): triton >= 75% of the copy bandwidth for float32 and bfloat16 at
N=8192, V=50304; extra memory = the output plus O(N).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from torchcurv.kernels import ce_hessian_matmat
from torchcurv.kernels.ce_hvp import _ce_hessian_matmat_eager
from torchcurv.kernels.ce_hvp_triton import KernelConfig, ce_hessian_matmat_triton, default_config

N, V = 8192, 50304
BLOCK = (16, 1024)  # (M, N): 16 directions sharing the softmax of 1024 rows
CHECK_ROWS = 64
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
BACKENDS = ("eager", "compile", "triton")


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median device milliseconds per call of ``fn``: CUDA events around each call, the
    call enqueued behind a GPU spin that lasts until the host has launched all of it (the
    start event still pending once ``fn`` returns; the spin doubles until it is), so the
    host's launch latency is not counted. :func:`call_ms` is the latency with it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    spin_cycles, times = 1 << 20, []
    while len(times) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin_cycles)
        start.record()
        fn()
        end.record()
        launched_ahead = not start.query()
        end.synchronize()
        if launched_ahead:
            times.append(start.elapsed_time(end))
        elif spin_cycles < 1 << 32:
            spin_cycles *= 2
        else:
            raise RuntimeError("the call synchronizes with the device: no device time")
    return statistics.median(times)


def call_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds from issuing ``fn`` on an idle device to its last kernel's end
    (CUDA events, synchronized after each call): device time plus host launch latency."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median host milliseconds for ``fn`` to return while the device is busy (behind a
    GPU spin): what launching the call costs the CPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(1 << 22)
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * nbytes / (ms * 1e-3)


def extra_peak_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Peak device memory a call allocates beyond what was live before it (output included)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra


def make_inputs(m: int | None, n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n, V, generator=g, device="cuda") * 2.0).to(dtype)
    shape = (n, V) if m is None else (m, n, V)
    U = torch.randn(*shape, generator=g, device="cuda").to(dtype)
    counted = torch.rand(n, generator=g, device="cuda") > 0.1  # ~10% ignored rows
    weights = counted.float() / counted.sum()
    return logits, U, weights


def check(fill: Callable[[torch.Tensor], object], logits, U, weights) -> float:
    """Relative error of rows [0, CHECK_ROWS) against float64 after ``fill(out)`` wrote
    ``out``; NaN if any element of ``out`` was left unwritten or is not finite."""
    out = torch.full_like(U, float("nan"))
    fill(out)
    if not torch.isfinite(out).all():
        return float("nan")
    rows = slice(0, CHECK_ROWS)
    expected = _ce_hessian_matmat_eager(
        logits[rows].double(), U[..., rows, :].double(), weights[rows].double()
    )
    got = out[..., rows, :].double()
    return float((got - expected).norm() / expected.norm())


def measure(
    backend: str, dtype: torch.dtype, m: int | None, n: int, copy_bw: float, seed: int
) -> dict:
    logits, U, weights = make_inputs(m, n, dtype, seed)
    err = check(
        lambda out: ce_hessian_matmat(logits, U, weights, backend=backend, out=out),
        logits, U, weights,
    )  # fmt: skip
    call = lambda: ce_hessian_matmat(logits, U, weights, backend=backend)  # noqa: E731
    row = _timed_row(backend, call, logits, U, err, copy_bw)
    if backend == "triton":
        row["triton_config"] = repr(default_config(V, m or 1, U.element_size()))
    return row


def sweep_grid(m: int | None) -> list[KernelConfig]:
    """Launch configurations timed by ``--sweep`` (chunk, block_m, num_warps, maxnreg)."""
    block_ms = (1,) if m is None else (2, 4, 8)
    return [
        KernelConfig(chunk, block_m, warps, maxnreg)
        for block_m, chunk, warps, maxnreg in itertools.product(
            block_ms, (1024, 2048, 4096, 8192), (4, 8), (None, 64, 72, 80)
        )
        if 2048 <= chunk * block_m <= 8192
    ]


def sweep(dtype: torch.dtype, m: int | None, n: int, copy_bw: float, seed: int) -> list[dict]:
    """The Triton kernel under every configuration of ``sweep_grid``: correct ones fastest
    first, then any that failed the float64 check."""
    logits, U, weights = make_inputs(m, n, dtype, seed)
    rows = []
    for config in sweep_grid(m):
        launch = functools.partial(ce_hessian_matmat_triton, logits, U, weights, config=config)
        err = check(lambda out, f=launch: f(out=out), logits, U, weights)
        row = _timed_row("triton", launch, logits, U, err, copy_bw)
        row["triton_config"] = repr(config)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return sorted(rows, key=lambda r: (not r["ok"], r["ms"]))


def _timed_row(backend, call, logits, U, err: float, copy_bw: float) -> dict:
    m = U.shape[0] if U.ndim == 3 else 1
    n = logits.shape[0]
    dtype = U.dtype
    ms = time_ms(call)
    latency = call_ms(call)
    host = host_ms(call)
    extra = extra_peak_bytes(call)
    out_bytes = U.numel() * U.element_size()
    moved = logits.numel() * logits.element_size() + 2 * out_bytes
    row = {
        "backend": backend,
        "dtype": str(dtype).removeprefix("torch."),
        "N": n,
        "V": V,
        "M": m or 1,
        "ms": round(ms, 4),
        "call_ms": round(latency, 4),
        "host_ms": round(host, 4),
        "effective_TBps": round(moved / (ms * 1e-3) / 1e12, 3),
        "fraction_of_copy": round(moved / (ms * 1e-3) / copy_bw, 3),
        "extra_peak_GiB": round(extra / 2**30, 3),
        "extra_beyond_output_MiB": round((extra - out_bytes) / 2**20, 1),
        "rel_err_vs_float64": float(f"{err:.3g}"),
        "ok": err < TOLERANCE[dtype],
    }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("--no-block", action="store_true", help="skip the M=16 block")
    parser.add_argument("--sweep", action="store_true", help="time the kernel's config grid")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    rows = [{
        "device": props.name, "sms": props.multi_processor_count,
        "torch": torch.__version__, "copy_TBps": round(copy_bw / 1e12, 3),
    }]  # fmt: skip
    print(json.dumps(rows[0]), flush=True)
    cases = [(None, N)] + ([BLOCK] if not args.no_block else [])
    for m, n in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for backend in BACKENDS:
                rows.append(measure(backend, dtype, m, n, copy_bw, seed=len(rows)))
                torch.cuda.empty_cache()
                print(json.dumps(rows[-1]), flush=True)
    best = []
    if args.sweep:
        for m, n in cases:
            for dtype in (torch.float32, torch.bfloat16):
                swept = sweep(dtype, m, n, copy_bw, seed=len(rows))
                best.append(swept[0])
                rows.extend({**r, "sweep": True} for r in swept)
                torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    print(f"\ncopy bandwidth {rows[0]['copy_TBps']} TB/s on {props.name}")
    print(f"{'backend':8} {'dtype':9} {'M':>3} {'N':>5} {'ms':>8} {'call_ms':>8} {'host_ms':>8} "
          f"{'TB/s':>6} {'copy%':>6} {'extraGiB':>8} {'rel_err':>9}")  # fmt: skip
    for r in [r for r in rows[1:] if not r.get("sweep")] + best:
        print(f"{r['backend']:8} {r['dtype']:9} {r['M']:>3} {r['N']:>5} {r['ms']:>8.3f} "
              f"{r['call_ms']:>8.3f} {r['host_ms']:>8.3f} "
              f"{r['effective_TBps']:>6.2f} {100 * r['fraction_of_copy']:>5.0f}% "
              f"{r['extra_peak_GiB']:>8.2f} {r['rel_err_vs_float64']:>9.2g}"
              f"{'' if r['ok'] else '  WRONG'} {r.get('triton_config', '')}")  # fmt: skip
    return 0 if all(r["ok"] for r in rows[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
