"""``compile=True``: the same products as eager, to rounding, from graphs compiled once.

Every compiled path (``method="forward_over_reverse"``, ``method="finite_difference"``'s
gradients, ``jvp="forward"``) is compared with its eager product and with an explicit
float64 oracle, on data with two batch shapes and unequal batch weights. On the CPU the
graphs go through ``aot_eager`` (dynamo and AOTAutograd; inductor's C++ build costs tens
of seconds per graph on two cores); the inductor runs are marked ``gpu``. The counting
backend also checks when the kernels compile: once per batch shape and block width,
never again for the same shapes or for another batch weight.
"""

from __future__ import annotations

import pytest
import torch
from curvature_oracles import explicit_ggn
from torch import nn
from zoo import DT, assert_unchanged, case, explicit_hessian, rel, snapshot

import torchcurv
from torchcurv.derivatives import base
from torchcurv.operators.functional import CompileFailedError

# (operator, its keywords, oracle, tolerance against eager, graphs per batch shape for
# the two block widths used). Finite differences divide a difference of gradients by
# 2h ~ 1e-5 relative, so their rounding shows 1e5 times larger than a product's.
PATHS = {
    "hessian-forward_over_reverse": (torchcurv.HessianOperator,
                                     {"method": "forward_over_reverse"},
                                     explicit_hessian, 1e-12, 2),
    "hessian-finite_difference": (torchcurv.HessianOperator,
                                  {"method": "finite_difference"},
                                  explicit_hessian, 1e-9, 1),
    "ggn-forward": (torchcurv.GGNOperator, {"jvp": "forward"}, explicit_ggn, 1e-12, 2),
}
# the oracle bound of each path's eager product (finite differences: O(h^2) bias)
ORACLE_TOL = {"hessian-finite_difference": 1e-7}


@pytest.fixture
def graphs(monkeypatch):
    """Compile with ``aot_eager`` and collect the compiles (dynamo's compile ids: one
    per frame and guard set; dynamo may hand one compile's graph to the backend twice)."""
    seen: set[str] = set()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        seen.add(str(torch._guards.CompileContext.current_compile_id()))
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(base, "_COMPILE_BACKEND", counting)
    return seen


def _problem(device: str = "cpu", dtype: torch.dtype = DT):
    """The tanh MLP under cross-entropy with batches of 4, 4 and 2 examples, one target
    of the second batch ignored: two batch shapes, and two batches of one shape with
    different weights (3/9 and 4/9 of the loss)."""
    model, criterion, data = case("mlp_tanh", "ce", sizes=(4, 4, 2))
    data[1][1][0] = -100
    model = model.to(device, dtype)
    data = [(x.to(device, dtype), y.to(device)) for x, y in data]
    return model, criterion, data


def _compare(path: str, device: str = "cpu", dtype: torch.dtype = DT,
             tol: float | None = None) -> None:
    cls, options, oracle, float64_tol, _ = PATHS[path]
    tol = float64_tol if tol is None else tol
    model, criterion, data = _problem(device, dtype)
    before = snapshot(model)
    eager = cls(model, criterion, data, **options)
    compiled = cls(model, criterion, data, compile=True, **options)
    V = torch.randn(eager.n, 3, dtype=dtype, device=device,
                    generator=torch.Generator(device).manual_seed(0))
    for block in (V[:, :1], V):  # a matvec (no vmap) and a block
        expected = eager @ block
        for _ in range(2):  # the second product runs the graphs the first compiled
            assert rel(compiled @ block, expected) < tol
    if dtype == DT:
        assert rel(compiled @ V, oracle(model, criterion, data) @ V) < ORACLE_TOL.get(path, 1e-12)
    assert_unchanged(model, before)


@pytest.mark.parametrize("path", PATHS)
def test_compiled_products_are_the_eager_products_to_rounding(path, graphs):
    _compare(path)
    # two batch shapes; the vmapped kernels once per block width (1 and 3), the gradient
    # once; nothing for repeated products, nor for the second 4-example batch's weight
    assert len(graphs) == 2 * PATHS[path][4]


def test_each_operator_compiles_its_own_graphs(graphs):
    model, criterion, data = _problem()
    first = torchcurv.GGNOperator(model, criterion, data, compile=True)
    v = torch.ones(first.n, dtype=DT)
    out = first @ v
    assert len(graphs) == 2
    second = first.replace(param_filter="2.*")  # other parameters: other graphs
    assert second.config.compile and second.derivative.compile
    second @ v[:second.n]
    assert len(graphs) == 4
    assert torch.equal(first @ v, out) and len(graphs) == 4


@pytest.mark.parametrize(("cls", "options", "method"), [
    (torchcurv.HessianOperator, {}, "method='autograd'"),
    (torchcurv.GGNOperator, {"jvp": "double_vjp"}, "jvp='double_vjp'"),
    (torchcurv.GGNOperator, {"jvp": "finite_difference"}, "jvp='finite_difference'"),
    (torchcurv.EmpiricalFisherOperator, {"jvp": "double_vjp"}, "jvp='double_vjp'"),
])
def test_compile_without_a_compiled_path_is_refused_at_construction(cls, options, method):
    model, criterion, data = _problem()
    has_one = ("('forward_over_reverse', 'finite_difference')" if cls is
               torchcurv.HessianOperator else "('forward',)")
    with pytest.raises(ValueError) as refused:
        cls(model, criterion, data, compile=True, **options)
    assert f"{method} has no compiled path" in str(refused.value)
    assert f"{has_one} have one" in str(refused.value)
    with pytest.raises(TypeError, match="compile must be True or False, got 'yes'"):
        cls(model, criterion, data, compile="yes")
    # the same through replace, from an operator without compile
    with pytest.raises(ValueError, match="no compiled path"):
        cls(model, criterion, data, **options).replace(compile=True)


class _GraphBreak(nn.Module):
    """A model dynamo cannot trace as one graph (eager it is a plain MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return self.inner(x)


def test_a_model_that_does_not_compile_fails_loudly_and_is_given_back(graphs):
    torch.manual_seed(0)
    model = _GraphBreak()
    _, criterion, data = _problem()
    before = snapshot(model)
    H = torchcurv.HessianOperator(model, criterion, data, method="forward_over_reverse",
                                  compile=True)
    v = torch.ones(H.n, dtype=DT)
    with pytest.raises(CompileFailedError, match="construct the operator with compile=False"):
        H @ v
    assert_unchanged(model, before)
    eager = H.replace(compile=False)
    assert rel(eager @ v, explicit_hessian(model, criterion, data) @ v) < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_inductor_on_cuda(path, dtype):
    # float32: its rounding, amplified 1e5 times by finite differences
    tol = None if dtype == DT else (1e-3 if "finite" in path else 1e-5)
    _compare(path, "cuda", dtype, tol)


def test_finite_difference_references_of_a_compiled_operator_are_eager():
    from torchcurv.validation.references import rebuild

    model, criterion, data = _problem()
    G = torchcurv.GGNOperator(model, criterion, data, compile=True)
    reference = rebuild(G, jvp="finite_difference")  # which has no compiled path
    assert not reference.config.compile and not reference.derivative.compile
    assert G.config.compile and repr(G.derivative) == "<ForwardJvp 'forward' compiled>"


def test_shapes_beyond_the_recompile_limit_run_uncompiled_with_one_warning(graphs):
    model, criterion, data = case("mlp_tanh", "ce", sizes=(4, 3, 2, 1))
    G = torchcurv.GGNOperator(model, criterion, data, compile=True)
    v = torch.ones(G.n, dtype=DT)
    # dynamo's own patch: monkeypatch's undo deletes the entry of torch's config module
    with torch._dynamo.config.patch(recompile_limit=2), \
            pytest.warns(RuntimeWarning, match="recompile_limit .2. graphs") as caught:
        out = G @ v
        again = G @ v
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert len(graphs) == 2  # batches of 4 and 3 compiled; 2 and 1 ran uncompiled
    assert rel(out, explicit_ggn(model, criterion, data) @ v) < 1e-12
    assert torch.equal(again, out)


def test_compile_is_a_choice_of_the_strategy_and_refused_for_fsdp_models():
    from torchcurv.derivatives import strategy_for
    from torchcurv.distributed.sharding import FullyShardedDataParallel

    compilable = {("method", "forward_over_reverse"), ("method", "finite_difference"),
                  ("jvp", "forward")}
    for argument, name in [("method", "autograd"), ("jvp", "double_vjp"),
                           ("jvp", "finite_difference"), *compilable]:
        s = strategy_for(argument, name)
        assert s.can_compile == ((argument, name) in compilable) and not s.compile
    fd = strategy_for("method", "finite_difference", compile=True)
    fsdp = FullyShardedDataParallel()
    fsdp.check_derivative("HessianOperator", strategy_for("method", "finite_difference"))
    with pytest.raises(TypeError, match=r"HessianOperator\(compile=True\) does not support "
                                        "FSDP2-sharded models"):
        fsdp.check_derivative("HessianOperator", fd)


def test_a_model_that_writes_its_buffers_is_refused_also_for_finite_differences(graphs):
    # Eager finite differences take train-mode BatchNorm (plain autograd); the compiled
    # gradient is torch.func.grad, which refuses writes into captured buffers.
    model, criterion, data = case("cnn_bn", "ce", sizes=(4, 4))
    model.train()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="BatchNorm"):
        H = torchcurv.HessianOperator(model, criterion, data, method="finite_difference",
                                      compile=True)
    with pytest.raises(CompileFailedError, match="mutate a captured Tensor"):
        H @ torch.ones(H.n, dtype=DT)
    assert_unchanged(model, before)
