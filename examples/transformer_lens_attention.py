"""Top eigenvalues of the attention-only Hessian of a tiny TransformerLens model.

TransformerLens 4 removed ``HookedTransformer``; its models are ``TransformerBridge``s,
here booted natively from a config with random weights (no download). The objective is
the model's own next-token loss (``model(tokens, return_type="loss")``); ``param_filter``
keeps the attention weights of every layer, so the operator is the Hessian block of
attention alone.

Run: python examples/transformer_lens_attention.py
"""

import torch

try:
    import transformer_lens
    import transformer_lens.model_bridge.sources  # registers TransformerBridge.boot_native
except ImportError:
    # -c constraints.txt keeps the CPU torch: transformer-lens asks for torch itself
    raise SystemExit("this example needs transformer-lens; from the checkout: "
                     "python3 -m pip install -c constraints.txt -e '.[hf]'") from None

import torchcurv

cfg = transformer_lens.TransformerBridgeConfig(
    d_model=16, n_layers=2, n_ctx=16, d_head=8, n_heads=2, d_vocab=40, act_fn="gelu", seed=0,
)
model = transformer_lens.TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
g = torch.Generator().manual_seed(0)
data = [torch.randint(0, 40, (4, 8), generator=g)]  # token batches (B, T)

objective = torchcurv.transformer_lens_objective()
print(f"loss {float(objective(model, data[0]).detach()):.4f} "
      f"(the model's own: {float(model(data[0], return_type='loss').detach()):.4f})")

H = torchcurv.HessianOperator(model, objective, data, param_filter="*attn*")
print(f"attention-only Hessian: {H.n} x {H.n}, over {len(H.param_names)} tensors")
result = torchcurv.eigsh(H, k=3, which="LA", tol=1e-6, seed=0, return_eigenvectors=False)
print("top 3 eigenvalues:", [f"{x:.5f}" for x in result.eigenvalues.flip(0).tolist()])
print(f"{result.num_matvecs} Hessian-vector products, {result.wall_time:.1f} s")
