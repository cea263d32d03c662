"""Influence functions and a damped Newton-CG step with torchcurv.solve, checked densely.

Influence of training example ``i`` on the loss of test example ``t`` (Koh & Liang 2017):
``-grad L_t^T (H + lambda I)^{-1} grad L_i``. The inverse-HVPs of all test gradients
are one block solve (MINRES: the Hessian is indefinite away from a minimum). The
Newton-CG step ``-(G + lambda I)^{-1} grad L`` uses the GGN, which is PSD, so CG.
"""

import torch
from torch import nn

import torchcurv

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
criterion = nn.CrossEntropyLoss()
X, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
train = [(X[:32], y[:32]), (X[32:], y[32:])]
X_test, y_test = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
params = list(model.parameters())
damping = 1e-2


def gradient(x, t):
    grads = torch.autograd.grad(criterion(model(x), t), params)
    return torch.cat([g.reshape(-1) for g in grads])


H = torchcurv.HessianOperator(model, criterion, train)
test_grads = torch.stack([gradient(X_test[j:j + 1], y_test[j:j + 1]) for j in range(5)], 1)
train_grads = torch.stack([gradient(X[i:i + 1], y[i:i + 1]) for i in range(64)], 1)

ihvp = torchcurv.solve(H, test_grads, damping=damping, method="minres", tol=1e-10)
ihvp.raise_if_not_converged()
influence = -train_grads.T @ ihvp.x  # (train examples, test examples)

dense = H.to_dense() + damping * torch.eye(H.n, dtype=torch.float64)
expected = -train_grads.T @ torch.linalg.solve(dense, test_grads)
error = float((influence - expected).norm() / expected.norm())
print(f"influence of 64 training examples on 5 test losses: {ihvp.num_matvecs} HVPs, "
      f"relative error {error:.1e} against the dense solve")
assert error < 1e-7

G = torchcurv.GGNOperator(model, criterion, train)
g = gradient(X, y)
step = torchcurv.solve(G, -g, damping=damping, tol=1e-10)
step.raise_if_not_converged()
dense_step = torch.linalg.solve(G.to_dense() + damping * torch.eye(G.n, dtype=torch.float64), -g)
error = float((step.x - dense_step).norm() / dense_step.norm())
print(f"Newton-CG step: {int(step.iterations[0])} CG iterations, relative error {error:.1e}")
assert error < 1e-7
print("influence and Newton-CG agree with the dense answers")
