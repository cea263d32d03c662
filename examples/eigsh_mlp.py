"""Top Hessian eigenvalues of a small MLP, computed exactly via torch autograd.

Run: python examples/eigsh_mlp.py
"""

import torch
from torch import nn

import torchcurv

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()
data = [(torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,))) for _ in range(4)]

H = torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data)
print(f"Hessian: {H.n} x {H.n}")
eigenvalues = torch.linalg.eigvalsh(H.to_dense())
print("top 5 eigenvalues:", [f"{x:.6f}" for x in eigenvalues.flip(0)[:5].tolist()])
