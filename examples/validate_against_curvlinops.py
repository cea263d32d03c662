"""Check curvature operators against independent oracles, including curvlinops.

``torchcurv.validate(op, against=...)`` multiplies random probe vectors by ``op`` and by a
reference and reports the relative error ``||A v - R v|| / ||R v||`` per probe:

- ``"dense"``: the explicit matrix built by plain autograd (the ground truth);
- ``"finite_difference"``: the same operator rebuilt with central differences
  (expect ~1e-7 to 1e-10 in float64: the differencing error, not a bug);
- ``"curvlinops"``: the matching operator of curvlinops, installed without its
  dependencies (they replace a CPU torch by a CUDA one and pull a torchvision that does
  not import): ``python3 -m pip install -c constraints.txt -e '.[curvlinops-deps]'`` then
  ``python3 -m pip install --no-deps curvlinops-for-pytorch==3.0.1``.

The LayerNorm rows show why the ground truth matters: torchcurv's Hessian agrees with
plain autograd to machine precision, curvlinops' disagrees by several percent. curvlinops
computes Hessian products by torch.func compositions that give wrong second derivatives
through LayerNorm (torch 2.13; see docs/validation.md). Its GGN is right.

Run: python examples/validate_against_curvlinops.py   (needs curvlinops)
"""

import torch

try:
    import curvlinops
except ImportError:
    raise SystemExit(
        "this example needs curvlinops, installed without its dependencies (they would "
        "replace the CPU torch); from the checkout: python3 -m pip install -c "
        "constraints.txt -e '.[curvlinops-deps]' && python3 -m pip install --no-deps "
        "curvlinops-for-pytorch==3.0.1") from None
from torch import nn

import torchcurv
from torchcurv.validation import dense_matrix

torch.manual_seed(0)
MODELS = {
    "mlp (tanh)": nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
    "layernorm": nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)),
}
criterion = nn.CrossEntropyLoss()
# Unequal batches: the operators weight them by their loss terms (exact full-batch mean).
data = [(torch.randn(b, 6, dtype=torch.float64), torch.randint(0, 3, (b,))) for b in (5, 3, 2)]

print(f"{'operator':<9} {'model':<11} {'n':>4} {'vs dense':>9} {'vs fin.diff.':>12} "
      f"{'vs curvlinops':>14} {'curvlinops vs dense':>20}")
errors = {}
for name, model in MODELS.items():
    model.double()
    for kind in (torchcurv.HessianOperator, torchcurv.GGNOperator):
        op = kind(model, criterion, data)
        dense = torchcurv.validate(op, against="dense").max_error
        fd = torchcurv.validate(op, against="finite_difference").max_error
        theirs = torchcurv.validate(op, against="curvlinops").max_error
        # The third side of the triangle: curvlinops' own operator, wrapped as a
        # torchcurv operator, against the plain-autograd matrix.
        cl_kind = {torchcurv.HessianOperator: curvlinops.HessianLinearOperator,
                   torchcurv.GGNOperator: curvlinops.GGNLinearOperator}[kind]
        cl = torchcurv.from_linear_operator(
            cl_kind(model, criterion, list(model.parameters()), data,
                    check_deterministic=False))
        cl_dense = torchcurv.validate(cl, against=dense_matrix(op)).max_error
        label = kind.__name__.removesuffix("Operator")
        errors[label, name] = (dense, fd, theirs, cl_dense)
        print(f"{label:<9} {name:<11} {op.n:>4} {dense:>9.1e} {fd:>12.1e} {theirs:>14.1e} "
              f"{cl_dense:>20.1e}")

# What the table says, checked so that a change in either library shows up here.
if not all(e[0] < 1e-12 and e[1] < 1e-6 for e in errors.values()):
    raise SystemExit("torchcurv disagrees with an oracle")
if errors["GGN", "layernorm"][3] > 1e-12 or errors["Hessian", "mlp (tanh)"][3] > 1e-12:
    raise SystemExit("curvlinops disagrees where it used to agree")
print(f"\ntorchcurv matches plain autograd everywhere (max "
      f"{max(e[0] for e in errors.values()):.1e})")
lagging = errors["Hessian", "layernorm"][3]
if lagging > 1e-6:
    print(f"curvlinops' LayerNorm Hessian is off by {100 * lagging:.0f} %")
else:
    print("curvlinops' LayerNorm Hessian agrees too (a torch without the torch.func bug)")
