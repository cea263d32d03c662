"""Reference products ``V -> R V`` that :func:`torchcurv.validate` compares against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from torchcurv.errors import MissingExtraError
from torchcurv.operators.base import LinearOperator
from torchcurv.operators.curvature import CurvatureOperator
from torchcurv.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from torchcurv.operators.ggn import GGNOperator
from torchcurv.operators.hessian import HessianOperator
from torchcurv.operators.kfac import EKFACOperator, KFACOperator
from torchcurv.operators.output_space import OutputSpaceOperator
from torchcurv.validation.dense import dense_matrix

Product = Callable[[torch.Tensor], torch.Tensor]


def dense_reference(op: LinearOperator) -> Product:
    matrix = dense_matrix(op)
    return lambda V: matrix @ V


def finite_difference_reference(op: LinearOperator) -> Product:
    """The same operator rebuilt with its finite-difference derivative path."""
    if isinstance(op, HessianOperator):
        ref = rebuild(op, method="finite_difference")
    elif isinstance(op, OutputSpaceOperator):
        ref = rebuild(op, jvp="finite_difference")
    else:
        raise TypeError(f"no finite-difference form is known for {type(op).__name__}")
    return ref.matmat


def rebuild(op: CurvatureOperator, **changes: Any) -> CurvatureOperator:
    """``op.replace(**changes)`` without repeating the construction checks already passed
    on ``op``: the same matrix, so a reference differs only in how its products are
    computed; eager (``compile=False``), so that it also checks a compiled ``op``, and
    since ``jvp="finite_difference"`` has no compiled path."""
    return op.replace(check_deterministic=False, compile=False, **changes)


def curvlinops_reference(op: LinearOperator) -> Product:
    """The matching curvlinops 3.x operator on the same model, criterion, params, data."""
    try:
        import curvlinops
    except ImportError as exc:
        raise MissingExtraError(
            "curvlinops", "curvlinops-deps",
            "validate(op, against='curvlinops') (install curvlinops-for-pytorch with "
            "--no-deps beside it)",
        ) from exc
    kinds: dict[type[CurvatureOperator], Any] = {
        HessianOperator: curvlinops.HessianLinearOperator,
        GGNOperator: curvlinops.GGNLinearOperator,
        EmpiricalFisherOperator: curvlinops.EFLinearOperator,
        MCFisherOperator: curvlinops.FisherMCLinearOperator,
        KFACOperator: curvlinops.KFACLinearOperator,
        EKFACOperator: curvlinops.EKFACLinearOperator,
    }
    if not isinstance(op, CurvatureOperator) or type(op) not in kinds:
        raise TypeError(f"curvlinops has no counterpart of {type(op).__name__}")
    criterion = op.objective.criterion
    if criterion is None or op.objective.targets is None:
        raise ValueError("curvlinops needs a torch criterion on (X, y) batches, not an Objective")
    extra: dict[str, Any] = {}
    if isinstance(op, MCFisherOperator) or (
            isinstance(op, KFACOperator) and op.fisher_type == "mc"):
        if op._state is not None:
            raise ValueError("curvlinops draws from a seed; build the operator with seed=")
        if op.per_batch_seeds:
            raise ValueError(
                "curvlinops draws one stream through all batches; build the operator with "
                "per_batch_seeds=False"
            )
        extra = dict(seed=op.seed, mc_samples=op.mc_samples)
    if isinstance(op, KFACOperator):  # docs/kfac.md: the same settings, the same matrix
        extra.update(fisher_type=op.fisher_type, kfac_approx=op.kfac_approx,
                     separate_weight_and_bias=op.separate_weight_and_bias)
    ref = kinds[type(op)](op.model, criterion, list(op.params), op.data,
                          check_deterministic=False, **extra)
    return lambda V: ref @ V


def matrix_reference(reference: Any) -> Product:
    """Any operator or matrix: a torchcurv operator, a tensor, a NumPy array, a SciPy
    ``LinearOperator`` or anything with ``matmat`` or ``@``."""
    if isinstance(reference, LinearOperator):
        return reference.matmat
    if isinstance(reference, torch.Tensor):
        return lambda V: reference.to(V) @ V
    if isinstance(reference, np.ndarray) or hasattr(reference, "matmat"):
        apply = reference.matmat if hasattr(reference, "matmat") else reference.__matmul__

        def through_numpy(V: torch.Tensor) -> torch.Tensor:
            out = apply(V.detach().cpu().numpy())
            return torch.as_tensor(np.asarray(out)).to(V)

        return through_numpy
    if hasattr(reference, "__matmul__"):
        return lambda V: reference @ V
    raise TypeError(
        f"against must be 'dense', 'curvlinops', 'finite_difference' or an operator / "
        f"matrix, got {type(reference).__name__}"
    )
