"""Exceptions torchcurv raises, so callers can catch them by kind."""

from __future__ import annotations


class OperatorInputError(ValueError):
    """A vector given to an operator has the wrong type, shape, dtype or device, or NaN/inf
    entries."""


class NonFiniteLossError(FloatingPointError):
    """The loss (or a product) came out NaN or infinite on some batch."""


class NondeterminismError(RuntimeError):
    """The model or the data loader gives different results on repeated passes."""


class MissingExtraError(ImportError):
    """An optional dependency is needed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, what: str) -> None:
        super().__init__(
            f"{what} needs the optional package '{package}': "
            f"pip install 'torchcurv[{extra}]'"
        )
        self.package = package
        self.extra = extra


class DataChangedError(NondeterminismError):
    """The data gave other batches or loss-term counts than at the operator's construction
    (an exhausted or shortened loader, a changed data set)."""


class RankFailedError(RuntimeError):
    """Another rank of a distributed operator raised; its own traceback says why."""


class NotConvergedError(RuntimeError):
    """An iterative solve inside an operator product (:class:`~torchcurv.InverseOperator`)
    missed its tolerance; its result says by how much.

    Attributes:
        result: the :class:`~torchcurv.algorithms.solve.SolveResult` of the failed solve.
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result
