"""torchcurv's own solvers and estimators, in torch, on the operator's device."""
