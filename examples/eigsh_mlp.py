"""The top of an MLP's Hessian spectrum, two ways: scipy's ARPACK and torchcurv's Lanczos.

``torchcurv.as_linear_operator(H)`` makes the exact Hessian a
``scipy.sparse.linalg.LinearOperator``, so the unmodified scipy call works on it;
``torchcurv.eigsh(H, backend="lanczos")`` runs the same computation in torch, on the
model's device. Both only ever multiply ``H`` with vectors (no ``n x n`` matrix is built)
and must agree.

Run: python examples/eigsh_mlp.py
"""

import time

import scipy.sparse.linalg
import torch
from torch import nn

import torchcurv

K = 10

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()
data = [(torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,))) for _ in range(4)]
H = torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data)
print(f"Hessian of a {H.n}-parameter MLP over {len(data)} batches (float64, CPU)")

# scipy, unmodified: the adapter is a scipy LinearOperator whose matvec calls H.
A = torchcurv.as_linear_operator(H)
start = time.perf_counter()
scipy_values = scipy.sparse.linalg.eigsh(A, k=K, which="LA", return_eigenvectors=False)
scipy_time = time.perf_counter() - start
scipy_values.sort()

# torch: thick-restart Lanczos on the operator's device, with checked residuals.
result = torchcurv.eigsh(H, k=K, which="LA", backend="lanczos", tol=1e-10, seed=0)

print()
print(f"{'i':>3} {'scipy ARPACK':>20} {'torchcurv lanczos':>20} {'|difference|':>13} "
      f"{'residual/|l|':>13}")
for i in range(K - 1, -1, -1):
    ours = result.eigenvalues[i].item()
    relative_residual = result.residuals[i].item() / abs(ours)
    print(f"{K - 1 - i:>3} {scipy_values[i]:>20.12f} {ours:>20.12f} "
          f"{abs(scipy_values[i] - ours):>13.1e} {relative_residual:>13.1e}")
print()
print(f"scipy ARPACK:      {A.num_matvecs:4d} matvecs, {scipy_time:.2f} s")
print(f"torchcurv lanczos: {result.num_matvecs:4d} matvecs, {result.wall_time:.2f} s, "
      f"{int(result.converged.sum())}/{K} converged")

difference = float(abs(torch.from_numpy(scipy_values) - result.eigenvalues).max())
scale = float(result.eigenvalues.abs().max())
print(f"max |difference| / max |eigenvalue| = {difference / scale:.1e}")
if difference > 1e-8 * scale:
    raise SystemExit("scipy and torchcurv disagree")
print("scipy and torchcurv agree")
