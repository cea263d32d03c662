"""The fused Triton kernel against the float64 Hessian, at chunk edges and extreme inputs.

Runs on CUDA, or on the CPU under triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported; test_ce_hvp.py does that in a subprocess). Skips otherwise. On CUDA the
small chunks below split every row over several programs that exchange partial softmax
statistics; the interpreter runs programs one after another, so there each row is one chunk
and the cases check the arithmetic without the exchange.
"""

import pytest
import torch
from ce_reference import TOLERANCE, hessian_matrix_product, random_case, rel_err

from torchcurv.kernels import ce_hessian_matmat
from torchcurv.kernels.ce_hvp import triton_interpreter_active

pytest.importorskip("triton")

if triton_interpreter_active():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from torchcurv.kernels.ce_hvp_triton import KernelConfig, ce_hessian_matmat_triton, row_split

# Chunks of 16..64 elements, so small V is split over up to 5 programs, the last chunk
# partial. (The interpreter costs ~10 ms per program, so cases are kept small.)
CONFIGS = [
    KernelConfig(chunk=16, block_m=1),
    KernelConfig(chunk=16, block_m=2),
    KernelConfig(chunk=32, block_m=4, num_warps=4),
    KernelConfig(chunk=64, block_m=1, num_warps=2),
]
# (N, V, M, weighted): V at, below, just over and well past one chunk; N=1; M not a multiple
# of BLOCK_M; M=None for a 2-D U; with and without row weights.
SHAPES = [(1, 1, None, True), (1, 37, None, False), (3, 16, 3, True), (2, 33, 3, False),
          (2, 65, None, True)]  # fmt: skip


@pytest.mark.parametrize(
    ("v", "chunk", "max_split", "expected"),
    [(37, 16, 8, (3, 16)), (50304, 4096, 132, (13, 3872)), (64, 64, 8, (1, 64)),
     (1, 16, 8, (1, 16)), (50304, 1024, 8, (7, 7200)), (100, 16, 1, (1, 112))],
)  # fmt: skip
def test_rows_split_into_balanced_aligned_spans(v, chunk, max_split, expected):
    split, span = row_split(v, chunk, max_split)
    assert (split, span) == expected
    assert span % 16 == 0 and split * span >= v > (split - 1) * span
    assert split <= max_split


def _run(logits, U, w, config):
    out = torch.full_like(U, float("nan"))
    result = ce_hessian_matmat_triton(logits, U, w, out=out, config=config)
    assert result is out
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_kernel_equals_float64_hessian_across_tile_edges(config):
    for seed, (n, v, m, weighted) in enumerate(SHAPES):
        logits, U, w = random_case(n, v, m, torch.float32, DEVICE, seed=100 + seed)
        w = w if weighted else None
        out = _run(logits, U, w, config)
        assert rel_err(out, hessian_matrix_product(logits, U, w)) < 1e-5, (n, v, m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_half_and_double_inputs_accumulate_in_float32_or_float64(dtype):
    logits, U, w = random_case(3, 37, 3, dtype, DEVICE, seed=150)
    out = _run(logits, U, w, CONFIGS[1])
    assert out.dtype == dtype
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < TOLERANCE[dtype]


def test_masked_rows_are_zero_and_others_exact():
    logits, U, w = random_case(4, 37, 2, torch.float32, DEVICE, seed=200, masked_rows=(0, 3))
    out = _run(logits, U, w, CONFIGS[1])
    assert torch.equal(out[:, [0, 3]], torch.zeros_like(out[:, [0, 3]]))
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < 1e-5


# Offsets past exp's range (float32 overflows at exp(88.7)), in each dtype where its
# spacing still resolves the logits; and tiny logits (a uniform softmax).
EXTREMES = [(torch.float32, 3.0, 3e4), (torch.float32, 3.0, -3e4), (torch.float16, 10.0, 1e3),
            (torch.bfloat16, 10.0, 200.0), (torch.float32, 1e-30, 0.0)]  # fmt: skip


@pytest.mark.parametrize(("dtype", "scale", "shift"), EXTREMES)
def test_online_max_keeps_huge_and_tiny_logits_finite(dtype, scale, shift):
    logits, U, w = random_case(
        2, 40, 2, dtype, DEVICE, seed=300, logit_scale=scale, logit_shift=shift
    )
    out = _run(logits, U, w, CONFIGS[0])
    assert torch.isfinite(out).all()
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < TOLERANCE[dtype]


def test_max_in_the_last_chunk_rescales_the_earlier_sums():
    logits, U, w = random_case(2, 50, None, torch.float32, DEVICE, seed=400, logit_shift=1e3)
    # The row max arrives in the last chunk; sums over earlier chunks must be rescaled to it.
    logits[:, -1] = logits.max() + 2.0
    out = _run(logits, U, w, CONFIGS[0])
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < 1e-5


def test_strided_rows_and_directions_are_read_in_place():
    logits_wide, U_wide, w = random_case(3, 40, 2, torch.float32, DEVICE, seed=500)
    logits = logits_wide[:, :37]  # row stride 48, not V
    U = U_wide.transpose(0, 1).contiguous().transpose(0, 1)[..., :37]  # (M, N, V), odd strides
    out = _run(logits, U, w, CONFIGS[2])
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < 1e-5


def test_empty_batch_returns_empty_output():
    logits, U, w = random_case(0, 9, 2, torch.float32, DEVICE, seed=600)
    assert ce_hessian_matmat_triton(logits, U, w).shape == (2, 0, 9)


def test_public_api_dispatches_to_the_kernel():
    logits, U, w = random_case(3, 40, 2, torch.bfloat16, DEVICE, seed=700)
    out = ce_hessian_matmat(logits, U, w, backend="triton", out=torch.full_like(U, float("nan")))
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("v", [50304, 50257])
@pytest.mark.parametrize("m", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_kernel_at_vocabulary_scale(v, m, dtype):
    logits, U, w = random_case(64, v, m, dtype, "cuda", seed=800, masked_rows=(5,))
    out = ce_hessian_matmat(logits, U, w, backend="triton", out=torch.full_like(U, float("nan")))
    p = torch.softmax(logits.double(), dim=-1)
    pu = p * U.double()
    expected = (pu - p * pu.sum(-1, keepdim=True)) * w.double().unsqueeze(-1)
    assert rel_err(out, expected) < TOLERANCE[dtype]
    assert torch.equal(out[..., 5, :], torch.zeros_like(out[..., 5, :]))


@pytest.mark.gpu
def test_many_rows_split_many_ways_all_finish_and_agree():
    # 4096 rows x 50 chunks: far more programs than fit on the GPU, so chunks of a row wait
    # for siblings that start later; the ticket order must keep that from deadlocking.
    logits, U, w = random_case(4096, 50304, None, torch.float32, "cuda", seed=900)
    out = _run(logits, U, w, KernelConfig(chunk=1024, num_warps=4))
    expected = ce_hessian_matmat(logits, U, w, backend="eager")
    assert rel_err(out, expected) < 1e-5


@pytest.mark.gpu
def test_a_chunk_of_only_minus_infinity_logits_gets_zero_probability():
    logits, U, w = random_case(3, 50, 2, torch.float32, "cuda", seed=950)
    logits[:, :16] = float("-inf")  # exactly the first chunk
    out = _run(logits, U, w, CONFIGS[0])
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., :16], torch.zeros_like(out[..., :16]))
    assert rel_err(out, hessian_matrix_product(logits, U, w)) < 1e-5
