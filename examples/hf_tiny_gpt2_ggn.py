"""GGN spectrum of a tiny GPT-2: attention parameters against MLP parameters.

A 2-layer GPT-2 built from a ``transformers`` config (random weights, no download), on
padded dict batches as a tokenizer gives them. ``causal_lm_objective`` is the model's own
next-token loss with the logits as the GGN's output, so the loss Hessian is the
closed-form cross-entropy one (``torchcurv.kernels.ce_hessian_matmat``). ``param_filter``
globs select the attention or the MLP weights of every block; for each subset the top
GGN eigenvalues (``eigsh``) and the spectral density (stochastic Lanczos quadrature).

Run: python examples/hf_tiny_gpt2_ggn.py
"""

import torch

try:
    import transformers
except ImportError:
    # -c constraints.txt keeps the CPU torch: an unconstrained install may replace it
    raise SystemExit("this example needs transformers; from the checkout: "
                     "python3 -m pip install -c constraints.txt -e '.[hf]'") from None

import torchcurv

torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                 bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
model = transformers.GPT2LMHeadModel(config).double().eval()

g = torch.Generator().manual_seed(0)
data = []
for _ in range(2):
    ids = torch.randint(0, 50, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a right-padded sequence: its padded positions predict nothing
    data.append({"input_ids": ids, "attention_mask": mask,
                 "labels": ids.masked_fill(mask == 0, -100)})

objective = torchcurv.causal_lm_objective()
subsets = {"attention": "transformer.h.*.attn.*", "mlp": "transformer.h.*.mlp.*"}
for name, pattern in subsets.items():
    G = torchcurv.GGNOperator(model, objective, data, param_filter=pattern)
    top = torchcurv.eigsh(G, k=3, which="LA", tol=1e-6, seed=0, return_eigenvectors=False)
    density = torchcurv.spectral_density(G, num_probes=2, lanczos_steps=20, seed=0)
    mass = torch.trapezoid(density.density, density.grid)
    print(f"{name:9s} n={G.n:6d}  top-3 GGN eigenvalues "
          f"{[round(x, 5) for x in top.eigenvalues.flip(0).tolist()]}")
    print(f"{'':9s} density on [{density.grid[0]:.2e}, {density.grid[-1]:.2e}], "
          f"mass {mass:.3f}, {top.num_matvecs + density.num_matvecs} GGN products")
