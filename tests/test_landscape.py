"""torchcurv.loss_landscape: the data set's loss along curvature directions, exactly.

Oracles are explicit float64 losses of the concatenated data (``zoo.full_loss_fn``) and
dense Hessians / GGNs (``zoo``, ``curvature_oracles``); the model must come back bit for
bit after every call, also when it raises or is interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from curvature_oracles import explicit_ggn
from gloo_ranks import WORLD, assert_check_ok, run_checks, shard_of
from torch import nn
from zoo import (
    DT,
    assert_unchanged,
    case,
    explicit_hessian,
    full_loss_fn,
    make_data,
    rel,
    snapshot,
)

import torchcurv
import torchcurv.algorithms.landscape as landscape_module

ROOT = Path(__file__).resolve().parents[1]


def linear_regression(reduction: str = "mean"):
    """A linear model with MSE: the loss is exactly quadratic in the weights."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    return model, nn.MSELoss(reduction=reduction), make_data("mlp_tanh", "mse")


def oracle_losses(model, criterion, data, scape, params=None) -> torch.Tensor:
    """The concatenated data's loss at every grid point of ``scape``."""
    f, theta0 = full_loss_fn(model, criterion, data, params)
    t = scape.coordinates
    D = scape.directions.double()
    with torch.no_grad():
        if scape.ndim == 1:
            return torch.stack([f(theta0 + a * D[:, 0]) for a in t])
        return torch.stack([torch.stack([f(theta0 + a * D[:, 0] + b * D[:, 1]) for b in t])
                            for a in t])


def directional_oracles(model, criterion, data, D, params=None):
    """``L0``, ``g . d_a`` and ``D^T H D`` by plain autograd on the whole data set."""
    f, theta0 = full_loss_fn(model, criterion, data, params)
    theta = theta0.clone().requires_grad_(True)
    loss = f(theta)
    (g,) = torch.autograd.grad(loss, theta)
    H = explicit_hessian(model, criterion, data, params)
    return float(loss.detach()), g @ D, D.T @ H @ D


# -- the landscape is the loss, and the quadratic model is the Taylor model ------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("directions", ["random", ("random", "random")], ids=["line", "plane"])
def test_on_linear_regression_the_landscape_is_the_quadratic_model_exactly(reduction,
                                                                          directions):
    model, criterion, data = linear_regression(reduction)
    scape = torchcurv.loss_landscape(model, criterion, data, directions, span=(-2.0, 3.0),
                                     steps=7, seed=0)
    assert scape.losses.shape == (7,) * len(scape.slopes)
    scale = float(scape.losses.abs().max())
    assert float((scape.losses - scape.quadratic).abs().max()) <= 1e-12 * scale
    # ...and both are the loss of the data set as one batch (unequal batches weighted)
    assert float((scape.losses - oracle_losses(model, criterion, data, scape)).abs().max()) \
        <= 1e-12 * scale
    loss0, slopes, curvatures = directional_oracles(model, criterion, data,
                                                    scape.directions.double())
    assert scape.loss0 == pytest.approx(loss0, rel=1e-13)
    assert torch.allclose(scape.slopes, slopes, rtol=1e-12, atol=1e-13 * scale)
    assert torch.allclose(scape.curvatures, curvatures, rtol=1e-12, atol=1e-13 * scale)


def test_second_difference_at_zero_is_the_top_eigenvalue():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    r = torchcurv.eigsh(H, k=1, tol=1e-12)
    lam, v = float(r.eigenvalues[0]), r.eigenvectors[:, 0]
    h = 1e-3
    scape = torchcurv.loss_landscape(model, criterion, data, v, curvature=H, span=(-h, h),
                                     steps=3)
    minus, zero, plus = scape.losses.tolist()
    assert zero == pytest.approx(scape.loss0, rel=1e-14)
    # central differences: O(h^2) bias, against eigsh's eigenvalue
    assert (plus - 2 * zero + minus) / h**2 == pytest.approx(lam, rel=1e-5)
    assert (plus - minus) / (2 * h) == pytest.approx(float(scape.slopes[0]), rel=1e-5)
    assert float(scape.curvatures[0, 0]) == pytest.approx(lam, rel=1e-10)


def test_the_quadratic_model_is_tangent_but_not_equal_on_a_nonlinear_model():
    model, criterion, data = case("layernorm", "ce")
    scape = torchcurv.loss_landscape(model, criterion, data, "random", seed=3,
                                     normalization="filter", span=(-1.0, 1.0), steps=9)
    gap = (scape.losses - scape.quadratic).abs()
    assert float(gap[4]) <= 1e-14 * abs(scape.loss0)  # t = 0
    assert float(gap[[3, 5]].max()) < 1e-2 * float(gap[[0, 8]].max())  # O(t^3) near 0
    assert float(gap.max()) > 1e-3
    assert float((scape.losses - oracle_losses(model, criterion, data, scape)).abs().max()) \
        <= 1e-12 * float(scape.losses.abs().max())


def test_curvature_names_the_matrix_of_the_quadratic_model():
    model, criterion, data = case("mlp_tanh", "mse")
    D = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=DT,
                    generator=torch.Generator().manual_seed(2))
    scape = torchcurv.loss_landscape(model, criterion, data, D, curvature="ggn", steps=2)
    G = explicit_ggn(model, criterion, data)
    assert rel(scape.curvatures, D.T @ G @ D) < 1e-12
    assert scape.curvature == "GGNOperator"
    assert torch.equal(scape.directions, D)  # used as given without normalization


def test_a_parameter_selection_moves_only_the_selected_parameters():
    model, criterion, data = linear_regression()
    scape = torchcurv.loss_landscape(model, criterion, data, ["random", "random"], seed=1,
                                     param_filter="weight", steps=3)
    assert scape.directions.shape == (12, 2)
    want = oracle_losses(model, criterion, data, scape, params=[model.weight])
    assert float((scape.losses - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_microbatching_and_points_per_pass_change_the_cost_not_the_landscape():
    model, criterion, data = linear_regression()
    whole = torchcurv.loss_landscape(model, criterion, data, "random", seed=0, steps=9)
    split = torchcurv.loss_landscape(model, criterion, data, "random", seed=0, steps=9,
                                     microbatch_size=2, points_per_pass=4)
    assert split.num_passes == 3 and whole.num_passes == 1
    assert torch.allclose(split.losses, whole.losses, rtol=1e-13, atol=0)


# -- cost: one forward per batch per point, the data walked once per pass --------------
class CountingData(list):
    walks = 0

    def __iter__(self):
        CountingData.walks += 1
        return super().__iter__()


class CountingModel(nn.Module):
    """Counts the forwards run without autograd (the grid's), in a counter outside the
    model: torchcurv restores module attributes after every pass."""

    def __init__(self, inner: nn.Module, counter: dict, fail_at: int | None = None,
                 failure: BaseException | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.counter, self.fail_at, self.failure = counter, fail_at, failure

    def forward(self, x):
        if not torch.is_grad_enabled():
            self.counter["forwards"] += 1
            if self.counter["forwards"] == self.fail_at:
                raise self.failure
        return self.inner(x)


@pytest.mark.parametrize(("steps", "points_per_pass", "passes"),
                         [(5, None, 1), (17, None, 1), (17, 5, 4)])
def test_each_point_costs_one_forward_per_batch_and_the_data_one_walk_per_pass(
        steps, points_per_pass, passes):
    counter = {"forwards": 0}
    inner, criterion, data = case("mlp_tanh", "ce")
    model, data = CountingModel(inner, counter), CountingData(data)
    H = torchcurv.HessianOperator(model, criterion, data)
    counter["forwards"], CountingData.walks = 0, 0
    scape = torchcurv.loss_landscape(model, criterion, data, "random", seed=0, curvature=H,
                                     steps=steps, points_per_pass=points_per_pass)
    assert counter["forwards"] == steps * len(data)
    # one walk for the gradient, one for the product A D, then the grid's
    assert CountingData.walks == 2 + passes == 2 + scape.num_passes


# -- the model comes back bit-identical -------------------------------------------------
@pytest.mark.parametrize("model_name", ["mlp_tanh", "cnn_bn"])
def test_the_model_comes_back_bit_identical(model_name):
    model, criterion, data = case(model_name, "ce")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = snapshot(model)
    torchcurv.loss_landscape(model, criterion, data, ["random", "random"], seed=0, steps=3,
                             normalization="layer")
    assert_unchanged(model, before)


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("disk on fire")],
                         ids=["interrupt", "error"])
def test_the_model_comes_back_bit_identical_when_the_grid_is_interrupted(failure):
    counter = {"forwards": 0}
    inner, criterion, data = case("mlp_tanh", "ce")
    model = CountingModel(inner, counter, fail_at=7, failure=failure)
    H = torchcurv.HessianOperator(model, criterion, data)
    counter["forwards"] = 0  # from here on, only the grid's forwards count
    before = snapshot(inner)
    with pytest.raises(type(failure)):
        torchcurv.loss_landscape(model, criterion, data, "random", seed=0, curvature=H,
                                 steps=5)
    assert counter["forwards"] == 7
    assert_unchanged(inner, before)


def test_a_non_finite_loss_names_the_grid_point_and_leaves_the_model_intact():
    model, criterion, data = linear_regression()
    before = snapshot(model)
    with pytest.raises(torchcurv.NonFiniteLossError, match=r"at step \(-1e\+300\).*smaller"):
        torchcurv.loss_landscape(model, criterion, data, "random", seed=0,
                                 span=(-1e300, 1e300), steps=3)
    assert_unchanged(model, before)


# -- directions and their normalisation ---------------------------------------------------
def test_filter_normalization_gives_every_filter_its_weights_norm_and_fixes_biases():
    model, criterion, data = case("mlp_tanh", "ce")
    scape = torchcurv.loss_landscape(model, criterion, data, "random", seed=0, steps=2,
                                     normalization="filter")
    pieces = scape.directions[:, 0].split([p.numel() for p in model.parameters()])
    for (name, p), d in zip(model.named_parameters(), pieces):
        d = d.view(p.shape)
        if p.ndim == 1:
            assert not d.any(), f"{name} moved"
        else:
            assert torch.allclose(d.norm(dim=1), p.detach().norm(dim=1), rtol=1e-13), name


def test_layer_normalization_gives_every_parameter_its_weights_norm():
    model, criterion, data = case("mlp_tanh", "ce")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    scape = torchcurv.loss_landscape(model, criterion, data, v, steps=2,
                                     normalization="layer")
    pieces = scape.directions[:, 0].split([p.numel() for p in model.parameters()])
    for p, d in zip(model.parameters(), pieces):
        assert float(d.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-13)


def test_random_directions_follow_the_seed_and_have_unit_norm():
    model, criterion, data = linear_regression()

    def dirs(**kw):
        return torchcurv.loss_landscape(model, criterion, data, ["random", "random"],
                                        steps=2, **kw).directions

    a, b, c = dirs(seed=4), dirs(seed=4), dirs(seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.norm(dim=0), torch.ones(2, dtype=DT), rtol=1e-14)
    assert float((a[:, 0] - a[:, 1]).abs().max()) > 0.1  # two independent draws
    torch.manual_seed(9)
    d = dirs()
    torch.manual_seed(9)
    assert torch.equal(dirs(), d)


def test_an_eigenvector_block_and_mixed_directions_are_accepted():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    r = torchcurv.eigsh(H, k=2, tol=1e-10)
    plane = torchcurv.loss_landscape(model, criterion, data, r.eigenvectors, curvature=H,
                                     steps=3, span=(-0.1, 0.1))
    assert torch.allclose(plane.curvatures, torch.diag(r.eigenvalues), atol=1e-8)
    mixed = torchcurv.loss_landscape(model, criterion, data,
                                     [r.eigenvectors[:, 1].numpy(), "random"], seed=0,
                                     curvature=H, steps=3, span=(-0.1, 0.1))
    assert torch.equal(mixed.directions[:, 0], r.eigenvectors[:, 1])


N_MLP = 43  # parameters of zoo's mlp


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"directions": torch.ones(N_MLP + 1)}, torchcurv.OperatorInputError, r"\(43,\)"),
    ({"directions": torch.ones(N_MLP, 3)}, torchcurv.OperatorInputError, "one direction"),
    ({"directions": [torch.ones(N_MLP)] * 3}, torchcurv.OperatorInputError, "got 3"),
    ({"directions": torch.full((N_MLP,), float("nan"))}, torchcurv.OperatorInputError,
     "NaN"),
    ({"directions": torch.zeros(N_MLP)}, torchcurv.OperatorInputError, "zero vector"),
    ({"directions": "gaussian"}, ValueError, "'random'"),
    ({"directions": 3}, TypeError, "directions must be"),
    ({"span": (1.0, -1.0)}, ValueError, "low < high"),
    ({"span": 1.0}, ValueError, "pair"),
    ({"steps": 1}, ValueError, "steps"),
    ({"points_per_pass": 0}, ValueError, "points_per_pass"),
    ({"normalization": "batch"}, ValueError, "normalization"),
    ({"curvature": "kfac"}, ValueError, "curvature"),
])
def test_bad_arguments_raise_errors_that_name_them(kwargs, error, match):
    model, criterion, data = case("mlp_tanh", "ce")
    before = snapshot(model)
    args = {"directions": "random", **kwargs}
    with pytest.raises(error, match=match):
        torchcurv.loss_landscape(model, criterion, data, **args)
    assert_unchanged(model, before)


def test_a_direction_that_normalization_zeroes_is_refused():
    model, criterion, data = linear_regression()
    only_bias = torch.zeros(15, dtype=DT)
    only_bias[12:] = 1.0
    with pytest.raises(torchcurv.OperatorInputError, match="zero after filter"):
        torchcurv.loss_landscape(model, criterion, data, only_bias, normalization="filter")


def test_an_operator_for_other_objects_or_with_options_is_refused():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    other = case("mlp_tanh", "ce")[0]
    with pytest.raises(ValueError, match="another model"):
        torchcurv.loss_landscape(other, criterion, data, "random", curvature=H)
    with pytest.raises(ValueError, match="leave out param_filter, microbatch_size"):
        torchcurv.loss_landscape(model, criterion, data, "random", curvature=H,
                                 param_filter="0.*", microbatch_size=2)


# -- pictures ---------------------------------------------------------------------------
def test_plot_draws_the_curve_with_its_quadratic_model_and_the_plane_as_contours(tmp_path):
    model, criterion, data = case("mlp_tanh", "ce")
    line = torchcurv.loss_landscape(model, criterion, data, "random", seed=0, steps=5)
    path = line.plot(tmp_path / "line.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = line.plot()
    assert [ln.get_label() for ln in ax.get_lines()[:2]] == ["loss", "quadratic model"]
    assert (ax.get_lines()[1].get_ydata() == line.quadratic.numpy()).all()
    plane = torchcurv.loss_landscape(model, criterion, data, ("random", "random"), seed=0,
                                     steps=4)
    assert plane.plot(tmp_path / "plane.png").stat().st_size > 0
    assert "direction 2" in plane.plot().get_ylabel()


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    model, criterion, data = linear_regression()
    line = torchcurv.loss_landscape(model, criterion, data, "random", seed=0, steps=2)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(torchcurv.MissingExtraError, match=r"torchcurv\[plot\]"):
        line.plot()


# -- the command line -------------------------------------------------------------------
def cli_problem():
    """``(model, criterion, data)`` for ``torchcurv spectrum --module test_landscape:...``."""
    return case("mlp_tanh", "ce")


def test_cli_spectrum_draws_the_landscape_along_the_top_eigenvector(tmp_path):
    png, out = tmp_path / "scape.png", tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-m", "torchcurv", "spectrum", "--module", "test_landscape:cli_problem",
         "--k", "2", "--tol", "1e-10", "--trace-matvecs", "6", "--device", "cpu",
         "--landscape", str(png), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.read_text())["matrices"]["hessian"]
    scape = record["landscape"]
    lam = max(record["eigsh"][0]["eigenvalues"])
    assert scape["eigenvalue"] == pytest.approx(lam, rel=1e-8)
    model, criterion, data = cli_problem()
    H = torchcurv.HessianOperator(model, criterion, data)
    v = torchcurv.eigsh(H, k=1, tol=1e-10).eigenvectors[:, 0]
    want = torchcurv.loss_landscape(model, criterion, data, v, curvature=H,
                                    span=tuple(scape["span"]), steps=21)
    # the eigenvector's sign is arbitrary: the curve may come mirrored
    got = torch.tensor(scape["losses"], dtype=DT)
    assert min(rel(got, want.losses), rel(got.flip(0), want.losses)) < 1e-8


# -- CUDA -------------------------------------------------------------------------------
@pytest.mark.gpu
def test_on_cuda_the_landscape_is_the_cpu_one():
    model, criterion, data = case("layernorm", "ce")
    cpu = torchcurv.loss_landscape(model, criterion, data, ("random", "random"), seed=0,
                                   steps=5, normalization="filter")
    gpu_model = model.cuda()
    before = snapshot(gpu_model)
    gpu = torchcurv.loss_landscape(gpu_model, criterion, data, ("random", "random"), seed=0,
                                   steps=5, normalization="filter")
    assert gpu.directions.is_cuda
    assert torch.allclose(gpu.losses, cpu.losses, rtol=1e-12, atol=0)
    assert torch.allclose(gpu.curvatures, cpu.curvatures, rtol=1e-10, atol=1e-12)
    assert_unchanged(gpu_model, before)


# -- distributed (gloo, two CPU processes) -------------------------------------------------
def _same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    everyone = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(everyone, t.contiguous())
    assert all(torch.equal(everyone[0], x) for x in everyone), f"ranks differ on {what}"


def check_landscape_on_shards(rank):
    model, criterion, data = case("mlp_tanh", "ce")
    ddp = nn.parallel.DistributedDataParallel(model)
    reductions = []
    reduce = landscape_module.all_reduce_sum

    def counted(*args, **kwargs):
        reductions.append(1)
        return reduce(*args, **kwargs)

    torch.manual_seed(100 + rank)  # seed=None: rank 0's draw is broadcast
    before = snapshot(model)
    landscape_module.all_reduce_sum = counted
    try:
        scape = torchcurv.loss_landscape(ddp, criterion, shard_of(data, rank),
                                         ["random", "random"], steps=5, points_per_pass=7,
                                         normalization="filter")
    finally:
        landscape_module.all_reduce_sum = reduce
    assert_unchanged(model, before)
    assert scape.num_passes == 4 and len(reductions) == 1 + 4  # slopes, then one per pass
    _same_on_all_ranks(scape.directions, "random directions")
    _same_on_all_ranks(scape.losses, "losses")
    single = torchcurv.loss_landscape(model, criterion, data, scape.directions, steps=5,
                                      distributed=False)
    assert rel(scape.losses, single.losses) < 1e-13
    assert rel(scape.quadratic, single.quadratic) < 1e-12


def check_a_rank_failing_in_the_grid_fails_the_others(rank):
    counter = {"forwards": 0}
    inner, criterion, data = case("mlp_tanh", "ce")
    model = CountingModel(inner, counter, fail_at=3 if rank == 1 else None,
                          failure=RuntimeError("rank 1 broke"))
    shard = shard_of(data, rank)
    H = torchcurv.HessianOperator(model, criterion, shard)
    counter["forwards"] = 0
    before = snapshot(inner)
    expected = RuntimeError if rank == 1 else torchcurv.RankFailedError
    with pytest.raises(expected):
        torchcurv.loss_landscape(model, criterion, shard, "random", seed=0, curvature=H,
                                 steps=5)
    assert_unchanged(inner, before)
    # the collectives are still in step: the next landscape works on every rank
    model.fail_at = None
    scape = torchcurv.loss_landscape(model, criterion, shard, "random", seed=0, curvature=H,
                                     steps=3)
    _same_on_all_ranks(scape.losses, "losses after a failure")


CHECKS = [check_landscape_on_shards, check_a_rank_failing_in_the_grid_fails_the_others]


@pytest.fixture(scope="module")
def distributed_outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("landscape_ranks")
    hung = run_checks(out, CHECKS, collective_timeout_s=30, join_timeout_s=150)
    return out, hung


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_distributed(distributed_outcomes, check):
    assert_check_ok(*distributed_outcomes, check.__name__)
