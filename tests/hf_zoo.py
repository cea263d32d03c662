"""Tiny config-built HuggingFace / TransformerLens models, dict batches and oracles.

Builders import ``transformers`` / ``transformer_lens`` when called, so that test modules
can ``pytest.importorskip`` first. Oracles differentiate the model's *own* loss on all
the data concatenated into one batch with plain autograd (``torch.autograd.functional``).
"""

from __future__ import annotations

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

DT = torch.float64
VOCAB = 50
T = 6


def gpt2(attn_implementation: str = "eager", dtype: torch.dtype = DT, head: str = "lm",
         **config):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation=attn_implementation, **config,
    )
    cls = {"lm": transformers.GPT2LMHeadModel,
           "classifier": transformers.GPT2ForSequenceClassification}[head]
    return cls(cfg).to(dtype).eval()


def bart():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )
    return transformers.BartForConditionalGeneration(cfg).to(DT).eval()


def transformer_lens_model():
    """A random-weight TransformerLens 4 model (``TransformerBridge`` over its native
    architecture; ``HookedTransformer`` was removed in TransformerLens 4)."""
    import transformer_lens
    import transformer_lens.model_bridge.sources

    cfg = transformer_lens.TransformerBridgeConfig(
        d_model=16, n_layers=2, n_ctx=16, d_head=8, n_heads=2, d_vocab=VOCAB, act_fn="gelu",
        seed=0,
    )
    return transformer_lens.TransformerBridge.boot_native(cfg, dtype=DT).eval()


def lm_batches(sizes=(3, 2, 1), seed: int = 1, pad: bool = True) -> list[dict]:
    """Causal-LM batches of unequal size, right-padded, padded labels ``-100``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        ids = torch.randint(1, VOCAB, (b, T), generator=g)
        mask = torch.ones(b, T, dtype=torch.long)
        if pad:
            lengths = torch.randint(2, T + 1, (b,), generator=g)
            mask = (torch.arange(T) < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def seq2seq_batches(sizes=(3, 2, 1), seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        labels = torch.randint(2, VOCAB, (b, 4), generator=g)
        labels[0, -1] = -100
        batches.append({
            "input_ids": torch.randint(2, VOCAB, (b, T), generator=g),
            "attention_mask": torch.ones(b, T, dtype=torch.long),
            "labels": labels,
        })
    return batches


def classification_batches(problem_type: str, classes: int = 3, sizes=(3, 2, 1),
                           seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        if problem_type == "single_label_classification":
            labels = torch.randint(0, classes, (b,), generator=g)
        elif problem_type == "multi_label_classification":
            labels = torch.randint(0, 2, (b, classes), generator=g).to(DT)
        else:
            labels = torch.randn(b, classes, generator=g, dtype=DT)
        ids = torch.randint(1, VOCAB, (b, T), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones(b, T, dtype=torch.long),
                        "labels": labels})
    return batches


def concatenated(batches: list):
    """All batches as one (dicts of tensors or plain tensors, same trailing shapes)."""
    if isinstance(batches[0], torch.Tensor):
        return torch.cat(batches)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def flat_parameters(model, names: list[str]):
    """``(theta0, call_at)``: the named parameters flattened into one vector, and
    ``call_at(theta)``, a ``call(*args, **kwargs)`` that runs the model with ``theta``'s
    pieces substituted for them (so autograd differentiates in ``theta``)."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def call_at(theta: torch.Tensor):
        swapped = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return lambda *a, **kw: functional_call(model, swapped, a, kw)

    return torch.cat([named[n].detach().reshape(-1) for n in names]), call_at


def hessian_of(model, names: list[str], loss_of_model) -> torch.Tensor:
    """Plain-autograd Hessian of ``loss_of_model(call)`` in the named parameters, where
    ``call(*args, **kwargs)`` runs the model with those parameters substituted."""
    theta0, call_at = flat_parameters(model, names)
    with sdpa_kernel(SDPBackend.MATH):  # the oracle differentiates attention twice too
        return torch.autograd.functional.hessian(lambda t: loss_of_model(call_at(t)), theta0)


def hessian_by_rows(loss: torch.Tensor, params: list) -> torch.Tensor:
    """Row ``j`` is the gradient of ``dL/dtheta_j``: one plain backward per row.

    For models that ``functional_call`` cannot swap weights of: on a TransformerLens 4
    ``TransformerBridge`` it leaves the substituted tensors in place of the parameters.
    """
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.cat([r.reshape(-1) for r in torch.autograd.grad(gj, params, retain_graph=True)])
            for gj in flat]
    return torch.stack(rows)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ggn_of(model, names: list[str], rows_of_call, loss_of_rows) -> torch.Tensor:
    """Explicit ``Jᵀ H J``: ``J`` the reverse-mode Jacobian of the logits rows
    ``rows_of_call(call)`` in the named parameters, ``H`` the autograd Hessian of
    ``loss_of_rows`` at those rows. Both batch their backwards over output entries
    (``vectorize=True``: equal to the one-backward-per-entry loop to 1e-16, 15x faster)."""
    theta0, call_at = flat_parameters(model, names)

    def rows(theta: torch.Tensor) -> torch.Tensor:
        return rows_of_call(call_at(theta))

    with sdpa_kernel(SDPBackend.MATH):
        out = rows(theta0).detach()
        J = torch.autograd.functional.jacobian(rows, theta0, vectorize=True)
    H = torch.autograd.functional.hessian(loss_of_rows, out, vectorize=True)
    J, H = J.reshape(out.numel(), -1), H.reshape(out.numel(), out.numel())
    return J.T @ H @ J
