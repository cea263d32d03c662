"""The result of :func:`torchcurv.validate`."""

from __future__ import annotations

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
    """

    against: str
    relative_errors: torch.Tensor
    probes: int
    seed: int
    operator: str

    @property
    def max_error(self) -> float:
        """The largest per-probe relative error."""
        return float(self.relative_errors.max())

    def passed(self, rtol: float) -> bool:
        """Whether every probe agrees to relative tolerance ``rtol``."""
        return self.max_error <= rtol

    def __str__(self) -> str:
        errs = ", ".join(f"{e:.1e}" for e in self.relative_errors.tolist())
        return (f"{self.operator} vs {self.against}: max relative error "
                f"{self.max_error:.2e} over {self.probes} probes [{errs}]")
