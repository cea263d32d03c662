"""Curvature products through SDPA attention: the fused kernels have no double backward,
so products run on the math backend and equal those of eager attention."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("transformers")

from hf_zoo import DT, gpt2, lm_batches, rel

import torchcurv
from torchcurv.operators.attention import differentiable_attention

PARAMS = ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_proj.bias"]


def _enabled_backends() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(),
            b.cudnn_sdp_enabled())


def test_sdpa_model_cannot_be_differentiated_twice_outside_the_context():
    """The failure differentiable_attention exists for, reproduced on CPU."""
    model, batch = gpt2("sdpa"), lm_batches(sizes=(2,))[0]
    bias = model.transformer.h[0].attn.c_attn.bias
    loss = torchcurv.causal_lm_objective()(model, batch)
    (g,) = torch.autograd.grad(loss, bias, create_graph=True)
    with pytest.raises(RuntimeError, match="scaled_dot_product.*not implemented"):
        torch.autograd.grad(g, bias, torch.ones_like(g))


@pytest.mark.parametrize("method", ["autograd", "forward_over_reverse"])
def test_sdpa_hessian_products_equal_eager_attention(method):
    data = lm_batches()
    objective = torchcurv.causal_lm_objective()
    V = torch.randn(48 + 16, 3, dtype=DT, generator=torch.Generator().manual_seed(7))
    products = {}
    for impl in ("eager", "sdpa"):
        H = torchcurv.HessianOperator(gpt2(impl), objective, data, param_filter=PARAMS,
                                      method=method)
        products[impl] = H.matmat(V)
    assert rel(products["sdpa"], products["eager"]) < 1e-12


@pytest.mark.parametrize("flags", ["direct", "sdpa_kernel"])
def test_context_selects_math_and_restores_the_callers_backends(flags, monkeypatch):
    if flags == "sdpa_kernel":  # the fallback where torch's flag table is missing
        import torchcurv.operators.attention as attention

        monkeypatch.setattr(attention, "_FLAGS", None)
    before = _enabled_backends()
    with differentiable_attention():
        assert _enabled_backends() == (False, False, True, False)
    assert _enabled_backends() == before
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        users = _enabled_backends()
        with pytest.raises(KeyError), differentiable_attention():
            raise KeyError("interrupted product")
        assert _enabled_backends() == users == (True, True, False, False)


def test_product_leaves_the_callers_backends_as_they_were():
    H = torchcurv.HessianOperator(gpt2("sdpa"), torchcurv.causal_lm_objective(),
                                  lm_batches(sizes=(2,)), param_filter=PARAMS)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        H.matvec(torch.ones(H.n, dtype=DT))
        assert _enabled_backends() == (True, False, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_hessian_products_equal_eager(dtype):
    """On CUDA the efficient/flash kernels would be picked; products must still run."""
    data = [{k: v.cuda() for k, v in b.items()} for b in lm_batches(sizes=(4, 4))]
    objective = torchcurv.causal_lm_objective()
    out = {}
    for impl in ("eager", "sdpa"):
        model = gpt2(impl, dtype=dtype).cuda()
        H = torchcurv.HessianOperator(model, objective, data, param_filter=PARAMS)
        v = torch.linspace(-1, 1, H.n, device="cuda", dtype=dtype)
        out[impl] = H.matvec(v).double()
    assert rel(out["sdpa"], out["eager"]) < (1e-5 if dtype == torch.float32 else 5e-2)
