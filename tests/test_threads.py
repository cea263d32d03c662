"""Products from several threads give the single-threaded answer.

``torch.func`` transforms (forward-mode AD, ``vmap``, ``functional_call``) are not safe
to run concurrently, and per-product state kept on an operator leaks between concurrent
products. Each case here runs products in threads released together by a barrier and
compares every result with one computed beforehand, single-threaded, by an identical
operator. Tiny models keep each product short, so the threads interleave often.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from zoo import DT, case, rel

import torchcurv

THREADS = 4
ROUNDS = 12


def _make(kind: str, model, criterion, data):
    if kind == "ggn_forward":
        return torchcurv.GGNOperator(model, criterion, data)
    if kind == "ggn_double_vjp":
        return torchcurv.GGNOperator(model, criterion, data, jvp="double_vjp")
    if kind == "ef_forward":
        return torchcurv.EmpiricalFisherOperator(model, criterion, data)
    if kind == "mc_forward":
        return torchcurv.MCFisherOperator(model, criterion, data, mc_samples=2, seed=3)
    if kind == "mc_double_vjp":
        return torchcurv.MCFisherOperator(model, criterion, data, mc_samples=2, seed=3,
                                          jvp="double_vjp")
    if kind == "mc_per_batch_seeds":
        return torchcurv.MCFisherOperator(model, criterion, data, mc_samples=2, seed=3,
                                          jvp="double_vjp", per_batch_seeds=True)
    if kind == "hessian_forward_over_reverse":
        return torchcurv.HessianOperator(model, criterion, data, method="forward_over_reverse")
    if kind == "hessian_autograd":
        return torchcurv.HessianOperator(model, criterion, data)
    raise KeyError(kind)


def _run_together(work, threads: int = THREADS) -> list[BaseException]:
    """Run ``work(t)`` for ``t < threads`` concurrently; the exceptions they raised."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def body(t: int) -> None:
        try:
            barrier.wait()
            work(t)
        except BaseException as exc:  # reported by the caller, in the main thread
            errors.append(exc)

    pool = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return errors


def _block(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _check(results: list, errors: list[BaseException]) -> None:
    wrong = [r for r in results if r > 1e-12]
    assert not errors, f"{len(errors)} product(s) raised, first: {errors[0]!r}"
    assert not wrong, f"{len(wrong)} of {len(results)} products wrong (rel. error {max(wrong)})"


KINDS = ["ggn_forward", "ggn_double_vjp", "ef_forward", "mc_forward",
         "hessian_forward_over_reverse", "hessian_autograd"]


@pytest.mark.parametrize("kind", KINDS)
def test_distinct_operators_in_threads_give_single_threaded_products(kind):
    ops, expected, blocks = [], [], []
    for t in range(THREADS):
        model, criterion, data = case("mlp_tanh", "ce", sizes=(3, 2))
        with torch.no_grad():  # a different model per thread
            for p in model.parameters():
                p.mul_(1 + 0.1 * t)
        V = _block(sum(p.numel() for p in model.parameters()), t)
        twin = _make(kind, copy.deepcopy(model), criterion, copy.deepcopy(data))
        expected.append(twin.matmat(V))
        ops.append(_make(kind, model, criterion, data))
        blocks.append(V)
    results: list[float] = []

    def work(t: int) -> None:
        for _ in range(ROUNDS):
            results.append(rel(ops[t].matmat(blocks[t]), expected[t]))

    _check(results, _run_together(work))


SHARED = ["ggn_forward", "mc_forward", "mc_double_vjp", "mc_per_batch_seeds",
          "hessian_forward_over_reverse"]


@pytest.mark.parametrize("kind", SHARED)
def test_one_operator_shared_by_threads_gives_single_threaded_products(kind):
    # The Monte-Carlo Fisher restarts its random stream per product: concurrent products
    # of one operator must each draw the labels a lone product draws.
    model, criterion, data = case("mlp_tanh", "ce", sizes=(3, 2, 2))
    op = _make(kind, model, criterion, data)
    blocks = [_block(op.n, t) for t in range(THREADS)]
    expected = [op.matmat(V) for V in blocks]
    results: list[float] = []

    def work(t: int) -> None:
        for _ in range(ROUNDS):
            results.append(rel(op.matmat(blocks[t]), expected[t]))

    _check(results, _run_together(work))
