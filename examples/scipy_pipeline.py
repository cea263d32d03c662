"""Curvature inside an existing SciPy workflow: damped Newton steps and expm_multiply.

``torchcurv.as_linear_operator(G)`` is an ordinary ``scipy.sparse.linalg.LinearOperator``:
scipy's operator algebra (``G + lam * I``), its Krylov solvers (``cg``) and its matrix
functions (``expm_multiply``) take it unchanged, and every product they ask for is one
exact GGN-vector product over the whole data set, computed by torch.

1. Damped Newton (Levenberg-Marquardt) steps ``theta <- theta - x`` with
   ``(G + lam I) x = g`` solved by conjugate gradients; the loss must fall.
2. ``exp(-t G) v`` by ``expm_multiply``, checked against the dense matrix exponential.

Run: python examples/scipy_pipeline.py
"""

import itertools

import numpy as np
import scipy.sparse
import scipy.sparse.linalg as sla
import torch
from torch import nn

import torchcurv

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()
criterion = nn.CrossEntropyLoss()
data = [(torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,))) for _ in range(4)]
X, y = torch.cat([x for x, _ in data]), torch.cat([t for _, t in data])


def loss_and_gradient(G: torchcurv.GGNOperator) -> tuple[float, np.ndarray]:
    """The full-data loss (the one the GGN is the curvature of) and its gradient."""
    loss = criterion(model(X), y)
    grads = torch.autograd.grad(loss, G.params)
    return loss.item(), G.flatten(grads).detach().numpy()


# Damping: the GGN of an overparameterised model is singular, and the quadratic model is
# trusted only near theta (with lam = 1e-3 the first steps overshoot and the loss rises).
LAM = 0.03

print(f"damped Newton steps, (G + lam I) x = g by scipy.sparse.linalg.cg, lam = {LAM}")
print(f"{'step':>4} {'loss':>12} {'|g|':>10} {'cg matvecs':>11} {'rel. residual':>14}")
losses = []
for step in range(4):
    G = torchcurv.GGNOperator(model, criterion, data)
    A = torchcurv.as_linear_operator(G)
    identity = sla.aslinearoperator(scipy.sparse.identity(G.n, dtype=np.float64))
    damped = A + LAM * identity
    loss, g = loss_and_gradient(G)
    losses.append(loss)
    x, info = sla.cg(damped, g, rtol=1e-8, maxiter=500)
    cg_matvecs = A.num_matvecs
    if info != 0:
        raise SystemExit(f"cg did not converge (info={info})")
    residual = np.linalg.norm(damped @ x - g) / np.linalg.norm(g)
    print(f"{step:>4} {loss:>12.6f} {np.linalg.norm(g):>10.2e} {cg_matvecs:>11} "
          f"{residual:>14.1e}")
    with torch.no_grad():
        for p, dx in zip(G.params, G.unflatten(torch.from_numpy(x))):
            p -= dx
final = criterion(model(X), y).item()
losses.append(final)
print(f"{4:>4} {final:>12.6f}")
if not all(b < a for a, b in itertools.pairwise(losses)):
    raise SystemExit("a damped Newton step did not decrease the loss")
print(f"the loss decreased at every step: {losses[0]:.6f} -> {final:.6f}")

# exp(-t G) v: the solution at time t of dv/dt = -G v. scipy estimates the trace of the
# operator when it is not given (extra products); torchcurv.trace gives it.
print("\nexp(-t G) v by scipy.sparse.linalg.expm_multiply")
G = torchcurv.GGNOperator(model, criterion, data)
A = torchcurv.as_linear_operator(G)
t = 10.0
v = np.random.default_rng(0).standard_normal(G.n)
trace = torchcurv.trace(G, num_matvecs=60, method="xtrace", seed=0).estimate
w = sla.expm_multiply(-t * A, v, traceA=-t * trace)
reference = torch.linalg.matrix_exp(-t * G.to_dense()) @ torch.from_numpy(v)
error = np.linalg.norm(w - reference.numpy()) / np.linalg.norm(reference.numpy())
print(f"t = {t}: |exp(-tG) v| / |v| = {np.linalg.norm(w) / np.linalg.norm(v):.4f}, "
      f"{A.num_matvecs} matvecs, relative error vs dense matrix_exp {error:.1e}")
if error > 1e-8:
    raise SystemExit("expm_multiply disagrees with the dense matrix exponential")
print("expm_multiply agrees with the dense matrix exponential")
