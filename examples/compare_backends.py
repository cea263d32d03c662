"""One curvature operator through every eigensolver backend, side by side.

``torchcurv.compare_backends`` runs ``torchcurv.eigsh`` with each backend on the same
operator, with the same ``k``, ``which``, ``tol`` and seed, and tabulates what each found:
converged pairs, agreement with the first backend, the largest relative residual
``||G v - l v|| / |l|`` (recomputed after the solve, so comparable across backends),
operator-vector products and wall time. Only the backends that can run here are
compared; the others (``cupy`` without CuPy or a GPU) are listed first with the reason.

Run: python examples/compare_backends.py
"""

import torch
from torch import nn

import torchcurv
from torchcurv.algorithms.compare import runnable_backends

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()
data = [(torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,))) for _ in range(4)]
# The GGN is positive semidefinite, so its largest ('LA') and largest-magnitude ('LM')
# eigenvalues are the same ones and every backend can be asked for them.
G = torchcurv.GGNOperator(model, nn.CrossEntropyLoss(), data)
print(f"GGN of a {G.n}-parameter MLP, float64, {G.device}")
runnable, reasons = runnable_backends(G, which="LA")
print(f"backends that can run here: {', '.join(runnable)}")
for name, why in reasons.items():
    print(f"  not {name}: {why}")

# Power iteration converges linearly (rate l2/l1), so it is compared on the one job it
# is used for, the top eigenvalue, below.
print("\n6 largest eigenvalues, tol=1e-8:\n")
top6 = torchcurv.compare_backends(
    G, k=6, which="LA", tol=1e-8,
    backends=[b for b in runnable if b != "power"],
)
print(top6)

print("\nthe largest eigenvalue, tol=1e-6:\n")
top1 = torchcurv.compare_backends(
    G, k=1, which="LM", tol=1e-6, backends=["arpack", "lanczos", "block", "power"],
)
print(top1)

ran = [row for comparison in (top6, top1) for row in comparison.rows if row.result is not None]
worst = max(row.eigenvalue_agreement for row in ran)
print(f"\nlargest disagreement between backends: {worst:.1e} (relative)")
if worst > 1e-6 or not all(row.result.all_converged for row in ran):
    raise SystemExit("the backends disagree or did not converge")
print("every backend that ran converged and agrees")
