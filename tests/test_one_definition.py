"""One definition per idea: every caller sees the same rule, so no two paths disagree.

Each test pins a rule that used to exist in several copies that disagreed: the
accumulation dtype, the ``which`` names, ``tol=0``, the walk over nested batches, the
finite-difference step, and the product counter. It also pins the frozen, typed results
and the subpackage homes of the kernel primitives.
"""

import ast
import dataclasses
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from zoo import DT, case, explicit_hessian, rel

import torchcurv
from torchcurv.algorithms.arguments import WHICH
from torchcurv.algorithms.eigsh import BACKENDS
from torchcurv.algorithms.lanczos import lanczos_eigsh
from torchcurv.algorithms.power import power_eigsh
from torchcurv.data import fingerprint, shapes, to_device
from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import NonFiniteLossError
from torchcurv.operators.counting import ProductCounter
from torchcurv.operators.functional import finite_difference_step
from torchcurv.operators.microbatch import split_batch

ROOT = Path(__file__).resolve().parents[1]


def spectrum_operator(n: int = 12) -> torchcurv.MatrixOperator:
    """``Q diag(1..n) Qᵀ`` with a fixed random rotation: known, well separated."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(0)))
    return torchcurv.MatrixOperator(Q @ torch.diag(torch.arange(1.0, n + 1, dtype=DT)) @ Q.T)


# -- accumulation dtype ----------------------------------------------------------------
def test_one_accumulation_dtype_for_operators_kernels_and_losses():
    from torchcurv.kernels import ce_hvp
    from torchcurv.losses import cross_entropy
    from torchcurv.operators import curvature

    assert curvature.accumulation_dtype is accumulation_dtype
    assert ce_hvp.accumulation_dtype is accumulation_dtype
    assert cross_entropy.accumulation_dtype is accumulation_dtype
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float16, torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float32) == torch.float32
    assert accumulation_dtype(torch.float16, torch.float64) == torch.float64


def test_the_triton_kernel_does_not_import_its_dispatcher():
    tree = ast.parse((ROOT / "torchcurv/kernels/ce_hvp_triton.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torchcurv.kernels.ce_hvp" not in imported


# -- which ---------------------------------------------------------------------------
def test_one_which_set_for_eigsh_the_backends_and_the_cli():
    from torchcurv.cli import build_parser

    assert WHICH == ("LA", "SA", "LM", "SM", "BE")
    served = {w for b in BACKENDS.values() for w in (b.which or ())}
    assert served == set(WHICH)
    args = build_parser().parse_args(["spectrum", "--which", "SM"])
    assert args.which == "SM"


def test_sm_is_found_by_arpack_and_refused_by_lanczos_naming_arpack():
    op = spectrum_operator()
    r = torchcurv.eigsh(op, k=2, which="SM", backend="arpack", tol=1e-10)
    assert torch.allclose(r.eigenvalues, torch.tensor([1.0, 2.0], dtype=DT))
    for call in (lambda: lanczos_eigsh(op, k=2, which="SM"),
                 lambda: torchcurv.eigsh(op, k=2, which="SM", backend="lanczos")):
        with pytest.raises(ValueError, match="backends for 'SM': arpack"):
            call()


# -- tol = 0 -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["arpack", "lanczos", "block", "lobpcg"])
def test_tol_zero_means_machine_precision_through_eigsh(backend):
    op = spectrum_operator()
    r = torchcurv.eigsh(op, k=2, backend=backend, tol=0, seed=0, maxiter=50)
    assert r.tol == torch.finfo(DT).eps
    assert torch.allclose(r.eigenvalues, torch.tensor([11.0, 12.0], dtype=DT), rtol=1e-8)


def test_tol_zero_means_machine_precision_called_directly():
    op = spectrum_operator()
    assert lanczos_eigsh(op, k=2, tol=0).tol == torch.finfo(DT).eps
    assert power_eigsh(op, k=1, tol=0, maxiter=20).tol == torch.finfo(DT).eps
    single = torchcurv.MatrixOperator(torch.diag(torch.arange(1.0, 13.0)))
    assert lanczos_eigsh(single, k=2, tol=0).tol == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("tol", [-1e-3, float("inf"), float("nan"), "1e-6", True])
def test_bad_tol_is_refused_alike_by_eigsh_and_the_backends(tol):
    op = spectrum_operator()
    for call in (lambda: torchcurv.eigsh(op, k=2, tol=tol),
                 lambda: lanczos_eigsh(op, k=2, tol=tol),
                 lambda: power_eigsh(op, k=1, tol=tol)):
        with pytest.raises(ValueError, match="finite relative tolerance >= 0"):
            call()


# -- nested batches ------------------------------------------------------------------
class Features(Mapping):
    """A read-only mapping batch that is neither a dict nor has ``.to``."""

    def __init__(self, data):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


def test_every_walk_sees_the_tensors_of_any_mapping_batch():
    batch = Features({"x": torch.randn(4, 3), "y": (torch.arange(4), torch.tensor(2.0))})
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved, Features)
    assert moved["x"].device.type == "meta" and moved["y"][0].device.type == "meta"
    assert moved["y"][1].device.type == "meta"  # 0-dim tensors move too
    assert shapes(batch) == (("x", (4, 3)), ("y", ((4,), ())))
    assert fingerprint(batch) == fingerprint(Features(dict(batch)))
    halves = split_batch(batch, 2)
    assert [type(h) for h in halves] == [Features, Features]
    assert [tuple(h["x"].shape) for h in halves] == [(2, 3), (2, 3)]
    assert torch.equal(halves[1]["y"][0], torch.tensor([2, 3]))


# -- finite-difference step ----------------------------------------------------------
def test_finite_difference_step_rule():
    eps = torch.finfo(DT).eps
    assert finite_difference_step(DT, 3.0, 2.0) == pytest.approx(eps ** (1 / 3) * 4 / 2)
    assert finite_difference_step(DT, 3.0, 0.0) == pytest.approx(eps ** (1 / 3) * 4)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_zero_vector_product_checks_the_loss_like_every_other_product(kind):
    model, criterion, data = case("mlp_tanh", "mse")
    data = [(x.clone(), y) for x, y in data]
    data[1][0][0, 0] = float("nan")
    op = (torchcurv.HessianOperator(model, criterion, data, method="finite_difference",
                                    check_deterministic=False) if kind == "hessian" else
          torchcurv.GGNOperator(model, criterion, data, jvp="finite_difference",
                                check_deterministic=False))
    with pytest.raises(NonFiniteLossError, match=r"batch\(es\) \[1\]"):
        op.matvec(torch.zeros(op.n, dtype=DT))


def test_finite_difference_block_with_a_zero_column_is_the_hessian_block():
    model, criterion, data = case("mlp_tanh", "mse")
    H = torchcurv.HessianOperator(model, criterion, data, method="finite_difference")
    V = torch.randn(H.n, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    V[:, 1] = 0
    out = H.matmat(V)
    assert torch.equal(out[:, 1], torch.zeros(H.n, dtype=DT))
    assert rel(out, explicit_hessian(model, criterion, data) @ V) < 1e-7


# -- product counter -----------------------------------------------------------------
def test_one_counter_for_operators_and_adapters():
    op = spectrum_operator()
    assert isinstance(op, ProductCounter)
    assert isinstance(torchcurv.as_linear_operator(op), ProductCounter)


def test_uncounted_products_leave_the_counts_and_other_threads_count():
    op = spectrum_operator()
    v = torch.ones(op.n, dtype=DT)
    with op.uncounted():
        op.matvec(v)
        with op.uncounted():  # reentrant
            op.matmat(torch.ones(op.n, 2, dtype=DT))
        worker = threading.Thread(target=lambda: op.matmat(torch.ones(op.n, 3, dtype=DT)))
        worker.start()
        worker.join()
    assert (op.num_matvecs, op.num_calls) == (3, 1)
    op.matvec(v)
    assert (op.num_matvecs, op.num_calls) == (4, 2)


def test_residual_checks_are_not_counted_and_reported_as_check_matvecs():
    op = spectrum_operator()
    r = torchcurv.eigsh(op, k=3, backend="arpack", tol=1e-10)
    assert r.num_matvecs == op.num_matvecs
    assert r.info.check_matvecs == 3


# -- results -------------------------------------------------------------------------
def test_eigsh_results_are_frozen_and_typed():
    r = lanczos_eigsh(spectrum_operator(), k=2, tol=1e-10)
    assert isinstance(r.info, torchcurv.EigshInfo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.num_matvecs = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.info.restarts = 0
    assert r.info.stop_reason == "converged" and r.info.block_size == 1
    reported = r.info.as_dict()
    assert reported["ncv"] == r.info.ncv and "iterations_per_pair" not in reported


# -- namespaces ----------------------------------------------------------------------
def test_kernel_primitives_live_in_their_subpackages():
    for name in ("ce_hessian_matmat", "cross_entropy_row_weights", "differentiable_attention"):
        assert not hasattr(torchcurv, name) and name not in torchcurv.__all__
    from torchcurv.kernels import ce_hessian_matmat, cross_entropy_row_weights  # noqa: F401
    from torchcurv.operators.attention import differentiable_attention  # noqa: F401

