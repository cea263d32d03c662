"""The GGN of a HuggingFace causal LM is the explicit ``Jᵀ H J`` of its logits and its
next-token loss, for every JVP method and attention implementation (tiny GPT-2, float64)."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_zoo import concatenated, ggn_of, gpt2, lm_batches, rel

import torchcurv

PARAMS = ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.ln_2.*"]  # 48 + 32 entries


def _shifted_loss(batch):
    """HuggingFace's shifted, masked CE written out over ``(B*T, V)`` rows (float64)."""
    def loss(rows):
        logits = rows.reshape(*batch["input_ids"].shape, -1)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    return loss


@pytest.fixture(scope="module")
def exact():
    data = lm_batches(sizes=(2, 1))
    model = gpt2()
    names = [n for n, _ in model.named_parameters()
             if n == PARAMS[0] or n.startswith("transformer.h.1.ln_2.")]
    whole = concatenated(data)
    inputs = {k: v for k, v in whole.items() if k != "labels"}

    def rows_of(call):
        logits = call(**inputs, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])

    return data, ggn_of(model, names, rows_of, _shifted_loss(whole))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("jvp", ["forward", "finite_difference", "double_vjp"])
def test_causal_lm_ggn_equals_explicit_jt_h_j(exact, attn, jvp):
    data, expected = exact
    G = torchcurv.GGNOperator(gpt2(attn), torchcurv.causal_lm_objective(), data,
                              param_filter=PARAMS, jvp=jvp)
    assert G.n == expected.shape[0] == 80
    V = torch.randn(G.n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # central differences carry an O(h^2) bias, ~1e-10 relative in float64
    assert rel(G.matmat(V), expected @ V) < (1e-7 if jvp == "finite_difference" else 1e-11)


def test_microbatched_ggn_is_the_same_matrix(exact):
    data, expected = exact
    G = torchcurv.GGNOperator(gpt2("sdpa"), torchcurv.causal_lm_objective(), data,
                              param_filter=PARAMS, microbatch_size=1)
    V = torch.randn(G.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel(G.matmat(V), expected @ V) < 1e-11


def test_ggn_loss_hessian_goes_through_the_ce_kernel(monkeypatch, exact):
    """One formula for the CE loss Hessian: the GGN calls torchcurv.kernels' product."""
    import torchcurv.losses.cross_entropy as ce

    calls = []
    real = ce.ce_hessian_matmat
    monkeypatch.setattr(ce, "ce_hessian_matmat",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    G = torchcurv.GGNOperator(gpt2(), torchcurv.causal_lm_objective(), exact[0],
                              param_filter=PARAMS)
    G @ torch.ones(G.n, dtype=torch.float64)
    assert len(calls) == 2  # one per batch


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cuda_ggn_with_the_auto_ce_backend_equals_the_cpu_ggn(attn):
    """On CUDA the loss Hessian goes through the Triton kernel (backend "auto")."""
    data = lm_batches(sizes=(4, 4))
    objective = torchcurv.causal_lm_objective()
    out = {}
    for device in ("cpu", "cuda"):
        model = gpt2(attn, dtype=torch.float32).to(device)
        batches = [{k: v.to(device) for k, v in b.items()} for b in data]
        G = torchcurv.GGNOperator(model, objective, batches, param_filter=PARAMS,
                                  microbatch_size=2)
        V = torch.linspace(-1, 1, G.n * 3, device=device).reshape(G.n, 3)
        out[device] = G.matmat(V).double().cpu()
    assert rel(out["cuda"], out["cpu"]) < 1e-4
