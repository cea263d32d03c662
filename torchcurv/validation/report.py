"""The result of :func:`torchcurv.validate`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ValidationReport:
    """Per-probe relative errors of an operator against a reference.

    Attributes:
        against: what the reference was (``"dense"``, ``"curvlinops"``,
            ``"finite_difference"`` or the reference's type name).
        relative_errors: ``(probes,)`` float64 CPU tensor,
            ``||A v - R v|| / ||R v||`` per probe ``v`` (absolute where ``R v = 0``).
        probes: number of probe vectors.
        seed: seed of the standard-normal probes.
        operator: ``repr`` of the validated operator.
        rtol: the tolerance of the verdict (:meth:`passed` without an argument, and
            ``str()``), from :func:`default_rtol` unless ``validate(rtol=...)`` gave one.
    """

    against: str
    relative_errors: torch.Tensor
    probes: int
    seed: int
    operator: str
    rtol: float = math.nan

    @property
    def max_error(self) -> float:
        """The largest per-probe relative error."""
        return float(self.relative_errors.max())

    def passed(self, rtol: float | None = None) -> bool:
        """Whether every probe agrees to relative tolerance ``rtol`` (default
        :attr:`rtol`)."""
        return self.max_error <= (self.rtol if rtol is None else rtol)

    def __str__(self) -> str:
        errs = ", ".join(f"{e:.1e}" for e in self.relative_errors.tolist())
        verdict = "PASS" if self.passed() else "FAIL"
        return (f"{verdict}: {self.operator} vs {self.against}: max relative error "
                f"{self.max_error:.2e} {'<=' if self.passed() else '>'} rtol "
                f"{self.rtol:.1e} over {self.probes} probes [{errs}]")


EXACT_EPS = 1000
"""An exact reference (dense autograd, a matrix, curvlinops) agrees to rounding: this many
machine epsilons of the operator's dtype (products accumulate ~n roundings, n small)."""


def default_rtol(against: str, dtype: torch.dtype) -> float:
    """The verdict's tolerance for a reference and the operator's dtype.

    ``1000 eps`` for exact references; ``10 eps^(1/3)`` for ``"finite_difference"``,
    whose central differences are accurate to ``O(h^2)`` with the step ``h ~ eps^(1/3)``
    that balances that against rounding (about 6e-5 in float64, 5e-2 in float32).
    """
    eps = torch.finfo(dtype).eps
    if against == "finite_difference":
        return 10 * eps ** (1 / 3)
    return EXACT_EPS * eps
