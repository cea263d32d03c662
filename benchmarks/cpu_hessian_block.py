"""Hessian blocks on the CPU: one second backward per vector vs the vmapped backward.

One batch of the benchmark MLP (784-512-512-10, 1024 samples), a block of 16 vectors;
prints ms per vector for torchcurv's CPU path (a loop of second backwards through the
shared first-order graph) and for ``is_grads_batched`` on the same graph, and one single
product, side by side in one run. Run with ``OMP_NUM_THREADS`` set as you want it.
"""

from __future__ import annotations

import time

import torch
from common import emit, machine, mlp_problem

import torchcurv
from torchcurv.operators.functional import scaled


def seconds(fn) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def vmapped_block(model, criterion, batch, params, V_blocks) -> list[torch.Tensor]:
    x, y = batch
    with torch.enable_grad():
        grads = torch.autograd.grad(scaled(criterion(model(x), y), 1.0), params,
                                    create_graph=True)
        return list(torch.autograd.grad(grads, params, grad_outputs=V_blocks,
                                        is_grads_batched=True))


def main() -> None:
    device = torch.device("cpu")
    emit(what="machine", **machine(device))
    model, criterion, data = mlp_problem(device)
    H = torchcurv.HessianOperator(model, criterion, data[:1])
    V = torch.randn(H.n, 16, generator=torch.Generator().manual_seed(0))
    single = seconds(lambda: H.matvec(V[:, 0]))
    loop = seconds(lambda: H.matmat(V))
    blocks = [b.contiguous() for b in H._split_block(V)]
    batched = seconds(lambda: vmapped_block(model, criterion, data[0], H.params, blocks))
    emit(what="cpu_hessian_block", single_ms=single * 1e3, loop_ms_per_vec=loop * 1e3 / 16,
         vmapped_ms_per_vec=batched * 1e3 / 16)


if __name__ == "__main__":
    main()
