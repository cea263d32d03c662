"""ce_hessian_matmat: every backend equals the float64 Hessian and torch's autograd.

The Triton kernel's own tests live in test_ce_hvp_triton.py; here they are also run once
under triton's CPU interpreter, in a subprocess because TRITON_INTERPRET is read at import.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ce_reference import TOLERANCE, hessian_matrix_product, random_case, rel_err
from torch.nn.functional import cross_entropy

import torchcurv
from torchcurv.kernels import ce_hessian_matmat, cross_entropy_row_weights
from torchcurv.kernels import ce_hvp as ce_hvp_module

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (backend, device). torch.compile on the CPU costs ~50 s cold on two cores: marked slow.
BACKENDS = [
    pytest.param("eager", "cpu", id="eager-cpu"),
    pytest.param("compile", "cpu", id="compile-cpu", marks=pytest.mark.slow),
    pytest.param("eager", "cuda", id="eager-cuda", marks=pytest.mark.gpu),
    pytest.param("compile", "cuda", id="compile-cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("auto", "cuda", id="auto-cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (N, V, M): odd V, N=1, V=1, a block of right-hand sides (M=None means U is (N, V)).
SHAPES = [(6, 37, None), (1, 129, None), (4, 1, None), (3, 50, 5), (1, 33, 2)]


@pytest.fixture(autouse=True)
def _fresh_dynamo_cache():
    # Each test's shape/dtype variants start from an empty cache, so no test runs into
    # dynamo's recompile limit and silently measures the eager fallback.
    torch._dynamo.reset()


def _poisoned(U: torch.Tensor) -> torch.Tensor:
    return torch.full_like(U, float("nan"))


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_backend_equals_float64_hessian_on_fresh_inputs(backend, device, dtype):
    for seed, (n, v, m) in enumerate(SHAPES):
        logits, U, w = random_case(n, v, m, dtype, device, seed=seed)
        expected = hessian_matrix_product(logits, U, w)
        out = ce_hessian_matmat(logits, U, w, backend=backend, out=_poisoned(U))
        assert out.dtype == U.dtype and out.shape == U.shape and out.device == U.device
        assert rel_err(out, expected) < TOLERANCE[dtype], (n, v, m)
        # And allocating the output itself; no weights means every row weighs 1.
        fresh = ce_hessian_matmat(logits, U, backend=backend)
        assert rel_err(fresh, hessian_matrix_product(logits, U, None)) < TOLERANCE[dtype]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_rows_with_zero_weight_are_exact_zeros(backend, device):
    logits, U, w = random_case(5, 41, 3, torch.float32, device, seed=11, masked_rows=(0, 3))
    out = ce_hessian_matmat(logits, U, w, backend=backend, out=_poisoned(U))
    assert torch.equal(out[:, [0, 3]], torch.zeros_like(out[:, [0, 3]]))
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < 1e-5

    logits, U, w = random_case(4, 41, None, torch.bfloat16, device, seed=12)
    out = ce_hessian_matmat(logits, U, torch.zeros_like(w), backend=backend, out=_poisoned(U))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "scale", "shift"),
    [
        (torch.float32, 1e4, 0.0),  # peaked softmax: exp(1e4) overflows without the max
        (torch.float32, 3.0, 3e4),  # large common offset: the product is shift-invariant
        (torch.float32, 3.0, -3e4),
        (torch.float16, 5e3, 0.0),
        (torch.bfloat16, 3.0, 3e4),
        (torch.float32, 1e-30, 0.0),  # tiny logits: uniform softmax
    ],
)
def test_huge_and_tiny_logits_stay_finite_and_exact(backend, device, dtype, scale, shift):
    logits, U, w = random_case(
        4, 67, 2, dtype, device, seed=21, logit_scale=scale, logit_shift=shift
    )
    out = ce_hessian_matmat(logits, U, w, backend=backend, out=_poisoned(U))
    assert torch.isfinite(out).all()
    # The oracle sees the same rounded logits, so shift invariance is not assumed here.
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < TOLERANCE[dtype]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_block_of_directions_equals_separate_products(backend, device):
    logits, U, w = random_case(7, 45, 4, torch.float32, device, seed=31)
    block = ce_hessian_matmat(logits, U, w, backend=backend)
    for j in range(U.shape[0]):
        single = ce_hessian_matmat(logits, U[j], w, backend=backend)
        assert rel_err(block[j], single) < 1e-6


def _autograd_hessian_product(logits, target, U, **ce_kwargs):
    """(d^2/dz^2 F.cross_entropy(z, target, **ce_kwargs)) @ u, row-wise, by double backward."""
    z = logits.double().requires_grad_(True)
    loss = cross_entropy(z, target, **ce_kwargs)
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    cols = [torch.autograd.grad(grad, z, u.double(), retain_graph=True)[0] for u in U]
    return torch.stack(cols)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [(), (1, 4)], ids=["no-ignored", "ignored"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("class_weight", [False, True], ids=["unweighted", "class-weighted"])
def test_matches_autograd_hessian_of_torch_cross_entropy(
    reduction, ignored, label_smoothing, class_weight
):
    n, v = 6, 11
    logits, U, _ = random_case(n, v, 3, torch.float64, seed=41)
    target = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(42))
    target[list(ignored)] = -100
    weight = torch.rand(v, dtype=torch.float64) + 0.5 if class_weight else None
    options = dict(reduction=reduction, ignore_index=-100, label_smoothing=label_smoothing)
    expected = _autograd_hessian_product(logits, target, U, weight=weight, **options)

    w = cross_entropy_row_weights(
        target, num_classes=v, weight=weight, dtype=torch.float64, **options
    )
    out = ce_hessian_matmat(logits, U, w, backend="eager")
    assert rel_err(out, expected) < 1e-12


def test_label_smoothing_does_not_change_the_summed_hessian():
    target = torch.tensor([0, 3, 2, 2])
    plain = cross_entropy_row_weights(target, num_classes=5, reduction="sum")
    smoothed = cross_entropy_row_weights(
        target, num_classes=5, reduction="sum", label_smoothing=0.4
    )
    assert torch.equal(plain, smoothed) and torch.equal(plain, torch.ones(4))


def test_mean_weights_are_one_over_counted_rows_and_zero_when_all_ignored():
    target = torch.tensor([1, -100, 2, 0, -100])
    w = cross_entropy_row_weights(target, num_classes=3)
    assert torch.equal(w, torch.tensor([1 / 3, 0, 1 / 3, 1 / 3, 0], dtype=torch.float32))
    nothing = cross_entropy_row_weights(torch.full((3,), -100), num_classes=3)
    assert torch.equal(nothing, torch.zeros(3))


def test_result_is_not_part_of_an_autograd_graph():
    logits, U, w = random_case(3, 9, None, torch.float32, seed=51)
    out = ce_hessian_matmat(logits.requires_grad_(True), U, w, backend="eager")
    assert not out.requires_grad


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda z, U, w: (z[0], U[0], None), "logits must have shape"),
        (lambda z, U, w: (z[:, :0], U[:, :0], None), "V >= 1"),
        (lambda z, U, w: (z, U[:, :-1], None), "U must have shape"),
        (lambda z, U, w: (z, U.unsqueeze(0).unsqueeze(0), None), "U must have shape"),
        (lambda z, U, w: (z.long(), U, None), "logits must be float16"),
        (lambda z, U, w: (z, U.to(torch.complex64), None), "U must be float16"),
        (lambda z, U, w: (z, U.to("meta"), None), "U is on meta"),
        (lambda z, U, w: (z, U, w[:-1]), "weights must have shape"),
        (lambda z, U, w: (z, U, w > 1), "weights must be a floating-point"),
        (lambda z, U, w: (z, U, w.to("meta")), "weights are on meta"),
    ],
)
def test_bad_inputs_raise_operator_input_error_naming_the_problem(make, message):
    logits, U, w = random_case(3, 8, None, torch.float32, seed=61)
    args = make(logits, U, w)
    with pytest.raises(torchcurv.OperatorInputError, match=message):
        ce_hessian_matmat(*args, backend="eager")


def test_bad_out_raises_and_is_left_alone():
    logits, U, w = random_case(3, 8, 2, torch.float32, seed=62)
    for out in (torch.empty(3, 8), torch.empty_like(U, dtype=torch.float64)):
        with pytest.raises(torchcurv.OperatorInputError, match="out must match U"):
            ce_hessian_matmat(logits, U, w, backend="eager", out=out)
    strided = torch.empty(2, 3, 16)[..., ::2]
    with pytest.raises(torchcurv.OperatorInputError, match="contiguous along its last"):
        ce_hessian_matmat(logits, U, w, backend="eager", out=strided)


def test_unknown_backend_raises_value_error_listing_the_choices():
    logits, U, w = random_case(2, 5, None, torch.float32, seed=63)
    with pytest.raises(ValueError, match=r"backend must be one of .*'triton'"):
        ce_hessian_matmat(logits, U, w, backend="cuda")


def test_auto_prefers_triton_then_compile_on_cuda_and_eager_elsewhere():
    resolve = ce_hvp_module._resolve_backend
    assert resolve("auto", "cuda", True) == "triton"
    assert resolve("auto", "cuda", False) == "compile"
    assert resolve("auto", "cpu", True) == "eager"
    assert resolve("compile", "cpu", False) == "compile"


def test_triton_backend_without_triton_names_the_extra(monkeypatch):
    monkeypatch.setattr(ce_hvp_module, "_triton_installed", lambda: False)
    logits, U, w = random_case(2, 5, None, torch.float32, seed=64)
    with pytest.raises(torchcurv.MissingExtraError, match=r"torchcurv\[gpu\]"):
        ce_hessian_matmat(logits, U, w, backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, U, w = random_case(2, 5, None, torch.float32, seed=65)
    with pytest.raises(torchcurv.OperatorInputError, match="needs CUDA tensors"):
        ce_hessian_matmat(logits, U, w, backend="triton")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(reduction="none"), ValueError, "'mean' or 'sum'"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(weight=torch.ones(4)), torchcurv.OperatorInputError, r"shape \(3,\)"),
    ],
)
def test_row_weights_reject_options_without_a_hessian(kwargs, error, message):
    with pytest.raises(error, match=message):
        cross_entropy_row_weights(torch.tensor([0, 1]), num_classes=3, **kwargs)


def test_row_weights_reject_probability_targets():
    with pytest.raises(torchcurv.OperatorInputError, match="integer class indices"):
        cross_entropy_row_weights(torch.rand(2, 3), num_classes=3)


def test_importing_torchcurv_does_not_import_triton():
    code = "import sys, torchcurv, torchcurv.kernels; assert 'triton' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_passes_its_tests_under_the_cpu_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_ce_hvp_triton.py"]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
