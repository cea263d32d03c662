"""Random probe vectors and budgeted, blocked operator products for the stochastic estimators.

Shared by :func:`torchcurv.trace` and :func:`torchcurv.diagonal`: argument checks, drawing
probes reproducibly, multiplying blocks of them with the operator while counting every
product against the caller's budget, and the progress bar / callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

from torchcurv.algorithms.arguments import tqdm_bar
from torchcurv.operators.base import LinearOperator

Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS: tuple[Distribution, ...] = get_args(Distribution)

#: ``callback(num_matvecs_used, num_matvecs_budget)``, called after every operator call.
ProgressCallback = Callable[[int, int], None]


def check_operator(op: object, who: str) -> LinearOperator:
    """Return ``op`` if it is a real-valued torchcurv operator, else raise a clear error."""
    if isinstance(op, torch.Tensor):
        raise TypeError(
            f"{who} takes a torchcurv operator, got a tensor; wrap a dense symmetric "
            "matrix with torchcurv.MatrixOperator(matrix)"
        )
    if not isinstance(op, LinearOperator):
        raise TypeError(
            f"{who} takes a torchcurv.LinearOperator, got {type(op).__name__}"
        )
    if not op.dtype.is_floating_point:
        raise TypeError(f"{who} needs a real floating-point operator, got dtype {op.dtype}")
    return op


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_budget(num_matvecs: object, minimum: int, method: str) -> int:
    """``num_matvecs`` as an int of at least ``minimum`` (what ``method`` needs to run)."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int):
        raise TypeError(f"num_matvecs must be an int, got {num_matvecs!r}")
    if num_matvecs < minimum:
        raise ValueError(
            f"method={method!r} needs num_matvecs >= {minimum}, got {num_matvecs}"
        )
    return num_matvecs


def check_block_size(block_size: int | None) -> int | None:
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    return block_size


class ProbeSource:
    """Draws probe vectors one after another from one random stream.

    Each probe is drawn on its own, so the probes do not depend on how they are grouped
    into blocks (``block_size`` changes memory and speed, not the probes).

    Randomness follows torch: ``generator`` if given (probes are drawn on its device);
    else a fresh CPU generator seeded with ``seed``; else torch's global CPU generator,
    which ``torch.manual_seed`` controls. CPU draws are made in float64 and then moved and
    cast, so a fixed ``seed`` gives the same probes on every device.
    """

    def __init__(
        self,
        n: int,
        distribution: Distribution,
        dtype: torch.dtype,
        device: torch.device,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_choice(distribution, DISTRIBUTIONS, "distribution")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got {seed!r}")
            generator = torch.Generator().manual_seed(seed)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.n = n
        self.distribution = distribution
        self.dtype = dtype
        self.device = device
        self.generator = generator
        self._draw_device = generator.device if generator is not None else torch.device("cpu")

    def draw(self, m: int) -> torch.Tensor:
        """The next ``m`` probes as an ``(n, m)`` block in ``dtype`` on ``device``."""
        cols = [self._one() for _ in range(m)]
        return torch.stack(cols, dim=1).to(self.device, self.dtype)

    def _one(self) -> torch.Tensor:
        if self.distribution == "rademacher":
            bits = torch.randint(0, 2, (self.n,), dtype=torch.int8, generator=self.generator,
                                 device=self._draw_device)
            return (2 * bits - 1).to(torch.float64)
        return torch.randn(self.n, dtype=torch.float64, generator=self.generator,
                           device=self._draw_device)


class BudgetedProducts:
    """Multiply blocks with an operator, in column chunks, counting against a budget.

    Args:
        op: the operator.
        budget: the caller's ``num_matvecs``; exceeding it is a bug here, so it asserts.
        block_size: most columns per ``op.matmat`` call (``None``: the whole block at once).
        progress: show a tqdm bar over the budget (needs the ``progress`` extra).
        callback: ``callback(used, budget)`` after every operator call.
        desc: label of the progress bar.
    """

    def __init__(
        self,
        op: LinearOperator,
        budget: int,
        block_size: int | None,
        progress: bool,
        callback: ProgressCallback | None,
        desc: str,
    ) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.op = op
        self.budget = budget
        self.block_size = block_size
        self.callback = callback
        self.used = 0
        self._bar = tqdm_bar(budget, desc, unit="matvec") if progress else None

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``(n, m)`` in any float dtype; returned in V's dtype."""
        m = V.shape[1]
        assert self.used + m <= self.budget, "estimator exceeded its matvec budget"
        chunk = m if self.block_size is None else self.block_size
        out = []
        for start in range(0, m, chunk):
            block = V[:, start:start + chunk].to(self.op.dtype)
            out.append(self.op.matmat(block).to(V.dtype))
            self.used += block.shape[1]
            if self._bar is not None:
                self._bar.update(block.shape[1])
            if self.callback is not None:
                self.callback(self.used, self.budget)
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> BudgetedProducts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def leave_one_out_directions(R: torch.Tensor) -> torch.Tensor:
    """Unit columns ``s_i = R^{-T} e_i / ||R^{-T} e_i||`` for the exchangeable estimators.

    With ``Y = Q R`` (thin QR of the sketch ``Y = A Omega``), ``Q s_i`` is the one direction
    of ``range(Q)`` orthogonal to every column of ``Y`` but the ``i``-th, so the projector
    onto ``range(Y without column i)`` is ``Q (I - s_i s_i^T) Q^T``: XTrace and XDiag get all
    ``s`` leave-one-out projectors from one QR (Epperly, Tropp & Webber 2024, Sec. 2.1).

    A numerically singular ``R`` (the operator has rank below the sketch size) has its
    tiny pivots raised to ``eps * max|pivot|``: ``s_i`` then points into the spurious part
    of ``range(Q)``, which is the limit of the exact formula, and the estimators stay exact.

    Args:
        R: ``(s, s)`` upper-triangular factor.

    Returns:
        ``(s, s)`` float64 on R's device.
    """
    R = R.double()
    pivots = R.diagonal().clone()
    floor = (torch.finfo(torch.float64).eps * pivots.abs().max()).clamp_min(
        torch.finfo(torch.float64).tiny
    )
    sign = torch.where(pivots < 0, -1.0, 1.0).to(R)
    safe = torch.where(pivots.abs() < floor, sign * floor, pivots)
    R = R.clone()
    R.diagonal().copy_(safe)
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    inv_t = torch.linalg.solve_triangular(R.T, eye, upper=False)
    return inv_t / torch.linalg.vector_norm(inv_t, dim=0)
