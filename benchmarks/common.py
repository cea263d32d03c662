"""Shared setup for the benchmarks: timing, the two reference problems, JSON output."""

from __future__ import annotations

import json
import statistics
import sys
import time
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
