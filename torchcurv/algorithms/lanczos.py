"""Thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalization, in torch.

The algorithm, for block size ``p`` (``p = 1`` is :func:`lanczos_eigsh`; ``p > 1`` is
:func:`torchcurv.algorithms.block.block_eigsh`):

1. Grow an orthonormal Krylov basis ``Q`` of up to ``ncv`` vectors with the shared
   recurrence (:class:`~torchcurv.algorithms.krylov.KrylovBasis`: every new direction is
   orthogonalized against every stored vector by classical Gram-Schmidt, twice), which
   gives ``A Q = Q T + F E^T`` with ``T = Q^T A Q``.
2. Rayleigh-Ritz: ``T = S diag(theta) S^T``. The Ritz pair ``(theta_i, Q S e_i)`` has
   residual norm ``||R S[last block, i]||`` where ``F = Q_next R`` (for ``p = 1``:
   ``|beta * s_last,i|``), known without touching the operator.
3. When the ``k`` wanted Ritz pairs all have estimated residual ``<= tol * |theta|``, the
   Ritz vectors are formed and their true residuals ``||A v - theta v||`` are checked
   with one ``matmat`` (:func:`~torchcurv.algorithms.result.residual_norms`, counted in
   ``info.check_matvecs``, not in ``num_matvecs``); the solve stops only if the check
   agrees. Otherwise, or if the estimates have not converged:
4. Thick restart: keep the ``l`` most wanted Ritz vectors (``k <= l``, about halfway to
   ``ncv``), put the normalized residual block after them (``T`` becomes a diagonal plus
   an arrow of couplings ``R S``) and go to 1. ``maxiter`` bounds the restarts.

No ghosts: with the basis orthogonal to working precision, ``T`` never holds two Ritz
values for one eigenvector, and every returned pair's residual is checked.

Repeated eigenvalues: a single start vector's Krylov space contains only one direction of
each eigenspace (exactly, in exact arithmetic), so single-vector Lanczos sees an
eigenvalue of multiplicity ``r > 1`` once. It then returns the next eigenvalues instead
of the missing copies; each returned pair is still a true eigenpair (its residual is
small), so no residual check can reveal the omission. Rounding can re-introduce the
other copies after many restarts, but do not rely on it: use
:func:`~torchcurv.algorithms.block.block_eigsh` with ``block_size >= r``.

Memory: the basis is ``ncv x n`` (plus ``p x n`` work blocks); default
``ncv = min(n, max(2k + 1, 20))`` for ``p = 1`` (ARPACK's default). ``basis_dtype`` and
``basis_device`` store it elsewhere, e.g. in float32 or in host memory while the operator
runs on a GPU (it is then streamed to the device in chunks).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from torchcurv.algorithms.arguments import (
    Which,
    check_callback,
    check_k,
    check_maxiter,
    check_start,
    check_tol,
    progress_bar,
    synchronized_clock,
)
from torchcurv.algorithms.checkpoint import (
    check_checkpoint_path,
    cpu_copy,
    load_checkpoint,
    save_checkpoint,
    solve_arguments,
)
from torchcurv.algorithms.eigsh import check_backend_serves
from torchcurv.algorithms.krylov import KrylovBasis
from torchcurv.algorithms.probing import check_operator
from torchcurv.algorithms.result import (
    ConvergenceHistory,
    EigshInfo,
    EigshResult,
    StopReason,
    converged_mask,
    relative_residuals,
    residual_norms,
    start_block,
)

STAGNATION_CHECKS = 3
"""Stop after this many consecutive failed residual checks (estimates converged, true
residuals not): the operator's own rounding then limits the attainable accuracy."""


def lanczos_eigsh(
    op,
    *,
    k: int = 6,
    which: Which = "LA",
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int | None = None,
    return_eigenvectors: bool = True,
    ncv: int | None = None,
    v0: torch.Tensor | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> EigshResult:
    """``k`` eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        op: a torchcurv ``LinearOperator`` (``n x n``, symmetric).
        k: number of eigenpairs, ``1 <= k < n``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude, ``"BE"`` half from each end (one more from the high end if ``k``
            is odd), as in scipy.
        tol: relative residual ``||A v - lambda v|| <= tol * |lambda|``; ``0`` means the
            machine precision of the working dtype.
        maxiter: maximum number of restarts (default ``10 n``, as scipy's ARPACK).
        seed: seeds the start vector (and breakdown replacements); the same seed gives
            the same result on the same device.
        return_eigenvectors: also return the ``(n, k)`` eigenvectors. Without them the
            true residuals are still returned (the convergence check computes them, one
            Ritz vector at a time, so the ``k`` vectors never need memory at once).
        ncv: basis size, ``k + 1 <= ncv <= n``; default ``min(n, max(2k + 1, 20))``.
        v0: start vector ``(n,)`` (overrides ``seed`` for the start).
        basis_dtype: dtype in which the ``ncv x n`` basis is stored (default: the
            operator's).
        basis_device: device on which the basis is stored (default: the operator's;
            ``"auto"``: there if it fits beside one product, else host memory).
        callback: called after every restart cycle with a dict (``restart``,
            ``num_matvecs``, ``ritz_values`` and ``residual_estimates`` of the wanted
            pairs, ``num_converged``).
        progress: show a tqdm bar of converged pairs (needs ``tqdm``).
        checkpoint: a file path: the restart state is written there (atomically) after
            every thick restart, and a solve started while the file exists resumes
            from it, giving the eigenvalues of the uninterrupted run (bit-identical on
            the CPU for a deterministic operator) for the products that run had left.
            Refused when the file belongs to a solve with other arguments; deleted when
            the solve finishes (:mod:`~torchcurv.algorithms.checkpoint`).

    Returns:
        :class:`~torchcurv.algorithms.result.EigshResult` with ``backend="lanczos"``;
        ``info`` (:class:`~torchcurv.algorithms.result.EigshInfo`) holds ``restarts``,
        ``stop_reason`` (``"converged"``, ``"maxiter"`` or ``"stagnated"``), ``ncv``,
        ``block_size``, the basis' shape, dtype, device and bytes, ``check_matvecs``,
        ``residual_estimates``, ``history`` (the wanted pairs' Ritz residual estimates
        at every restart; ``source="ritz_estimates"``) and, after a resume,
        ``resumed_matvecs``.
    """
    return thick_restart_lanczos(
        op, k=k, which=which, tol=tol, maxiter=maxiter, seed=seed,
        return_eigenvectors=return_eigenvectors, block_size=1, ncv=ncv, v0=v0,
        basis_dtype=basis_dtype, basis_device=basis_device, callback=callback,
        progress=progress, backend="lanczos", checkpoint=checkpoint,
    )


def default_ncv(n: int, k: int, block_size: int) -> int:
    """ARPACK's ``min(n, max(2k + 1, 20))`` for ``p = 1``; ``min(n, max(2k + 1, 20,
    2k + 4p))`` for blocks (block Krylov spaces need more room per restart: on a small
    MLP Hessian, ``p = 10``, ``k = 10``, ``ncv = 60`` took 10 % fewer products than 50)."""
    if block_size == 1:
        return min(n, max(2 * k + 1, 20))
    return min(n, max(2 * k + 1, 20, 2 * k + 4 * block_size))


def thick_restart_lanczos(
    op,
    *,
    k: int,
    which: str,
    tol: float,
    maxiter: int | None,
    seed: int | None,
    return_eigenvectors: bool,
    block_size: int,
    ncv: int | None,
    v0: torch.Tensor | None,
    basis_dtype: torch.dtype | None,
    basis_device: torch.device | str | None,
    callback: Callable[[dict], None] | None,
    progress: bool,
    backend: str,
    checkpoint: str | os.PathLike | None = None,
) -> EigshResult:
    """The thick-restart (block) Lanczos driver behind ``lanczos`` and ``block``."""
    check_operator(op, backend)
    n = op.n
    k = check_k(k, n)
    which = check_backend_serves(backend, which)
    p = block_size
    m = default_ncv(n, k, p) if ncv is None else ncv
    if isinstance(m, bool) or not isinstance(m, int) or not k + p <= m <= n:
        raise ValueError(
            f"ncv must be an int with k + block_size <= ncv <= n, i.e. in "
            f"[{k + p}, {n}], got {ncv!r}"
        )
    maxiter = check_maxiter(maxiter, 10 * n)
    check_callback(callback)
    path = check_checkpoint_path(checkpoint)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    start = (start_block(n, p, torch.float64, torch.device("cpu"), generator=generator)
             if v0 is None else check_start(v0, n, p))

    begin = synchronized_clock(op.device)
    matvecs_before = op.num_matvecs
    kb = KrylovBasis(op, 1, m, basis_dtype=basis_dtype, basis_device=basis_device,
                     generator=generator)
    tol = check_tol(tol, kb.working_dtype)
    # Only a checkpointed solve names its arguments: the start vector's digest reads all
    # of it on the host (seconds at n ~ 1e9).
    arguments = {} if path is None else solve_arguments(
        op, backend=backend, k=k, which=which, tol=tol, ncv=m, block_size=p,
        basis_dtype=kb.basis.dtype, start=start)
    state = None if path is None else load_checkpoint(path, arguments)
    restarts, kept, failed_checks, check_matvecs, resumed = 0, 0, 0, 0, 0
    history: tuple[list[int], list[tuple[float, ...]]] = ([], [])
    if state is None:
        Q0, _ = kb.next_block(start.T[None].to(op.device, kb.compute_dtype), 0)
        kb.set_rows(0, Q0)
    else:
        restarts, kept, failed_checks, check_matvecs, resumed = _restore(kb, state)
        history = (list(state["history_matvecs"]),
                   [tuple(r) for r in state["history_residuals"]])

    def spent() -> int:
        return resumed + op.num_matvecs - matvecs_before

    with progress_bar(progress, k, f"torchcurv {backend}") as bar:
        stop_reason: StopReason = "maxiter"
        checked = None
        while True:
            last, F = kb.extend(kept, m, p)
            size = last + p
            theta, S = torch.linalg.eigh(kb.T[0, :size, :size])
            R = kb.block_qr(F)[1][0]
            estimates = (R @ S[last:size]).norm(dim=0)
            order = _priority(theta, which)
            wanted = order[:k]
            meets = converged_mask(theta[wanted], estimates[wanted], tol)
            ascending = wanted[torch.argsort(theta[wanted])]
            history[0].append(spent())
            history[1].append(relative_residuals(theta[ascending], estimates[ascending]))
            if callback is not None:
                callback({
                    "restart": restarts, "num_matvecs": spent(),
                    "ritz_values": theta[wanted].clone(), "residual_estimates":
                    estimates[wanted].clone(), "num_converged": int(meets.sum()),
                })
            if bar is not None:
                bar.n = int(meets.sum())
                bar.set_postfix(restarts=restarts, matvecs=spent())
            if bool(meets.all()):
                values = theta[ascending]
                vectors, residuals = _checked(kb, S[:, ascending], size, op, values,
                                              return_eigenvectors)
                check_matvecs += k
                checked = (values, vectors, residuals)
                if bool(converged_mask(values, residuals, tol).all()):
                    stop_reason = "converged"
                    break
                failed_checks += 1
                if failed_checks >= STAGNATION_CHECKS:
                    stop_reason = "stagnated"
                    break
            else:
                failed_checks = 0
            if restarts >= maxiter:
                break
            kept = _restart(kb, F, theta, S, order, last, size, k, p, m)
            restarts += 1
            if path is not None:
                save_checkpoint(path, arguments, {
                    "basis": cpu_copy(kb.basis[:, :kept + p]), "T": kb.T.clone(),
                    "anorm": kb.anorm, "generator": generator.get_state(),
                    "restarts": restarts, "kept": kept, "failed_checks": failed_checks,
                    "check_matvecs": check_matvecs, "num_matvecs": spent(),
                    "history_matvecs": list(history[0]),
                    "history_residuals": [list(r) for r in history[1]],
                })

    if checked is None or stop_reason == "maxiter":
        values = theta[ascending]
        vectors, residuals = _checked(kb, S[:, ascending], size, op, values,
                                      return_eigenvectors)
        check_matvecs += k
    else:
        values, vectors, residuals = checked
    converged = converged_mask(values, residuals, tol)
    num_matvecs = spent()
    if path is not None:
        path.unlink(missing_ok=True)  # finished: never resumed by another solve
    wall_time = synchronized_clock(op.device) - begin
    return EigshResult(
        eigenvalues=values.clone(),
        eigenvectors=vectors,
        residuals=residuals,
        converged=converged,
        num_matvecs=num_matvecs,
        wall_time=wall_time,
        backend=backend,
        which=which,
        tol=tol,
        info=EigshInfo(
            restarts=restarts, stop_reason=stop_reason, ncv=m, block_size=p,
            basis_shape=(m, n), basis_dtype=kb.basis.dtype, basis_device=kb.basis.device,
            basis_bytes=kb.basis_bytes, check_matvecs=check_matvecs,
            residual_estimates=estimates[ascending].clone(),
            history=ConvergenceHistory(tuple(history[0]), tuple(history[1]),
                                       "ritz_estimates"),
            resumed_matvecs=resumed if state is not None else None,
        ),
    )


def _restore(kb: KrylovBasis, state: dict) -> tuple[int, int, int, int, int]:
    """Put a checkpoint's restart state into ``kb`` (and its generator); returns
    ``(restarts, kept, failed_checks, check_matvecs, num_matvecs)``."""
    rows = state["basis"].shape[1]
    kb.set_rows(0, state["basis"])
    kb.basis[:, rows:] = 0
    kb.T.copy_(state["T"])
    kb.anorm = float(state["anorm"])
    kb.generator.set_state(state["generator"])
    return (int(state["restarts"]), int(state["kept"]), int(state["failed_checks"]),
            int(state["check_matvecs"]), int(state["num_matvecs"]))


def _priority(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of the Ritz values, most wanted first."""
    if which == "LA":
        return torch.argsort(theta, descending=True, stable=True)
    if which == "SA":
        return torch.argsort(theta, stable=True)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)
    ascending = torch.argsort(theta, stable=True).tolist()
    both_ends = []
    while ascending:  # BE: high, low, high, low, ... (scipy: extra one from the high end)
        both_ends.append(ascending.pop())
        if ascending:
            both_ends.append(ascending.pop(0))
    return torch.tensor(both_ends)


def _keep_count(k: int, p: int, m: int, size: int) -> int:
    """Ritz vectors kept at a restart: halfway between ``k`` and the room left for at
    least one new block, so each cycle adds about half a basis of new directions."""
    room = m - 2 * p
    if room < k:
        return min(k, size)
    return min(k + (room - k) // 2, size)


def _restart(kb: KrylovBasis, F: torch.Tensor, theta: torch.Tensor, S: torch.Tensor,
             order: torch.Tensor, last: int, size: int, k: int, p: int, m: int) -> int:
    """Thick restart in place from the cycle's Ritz decomposition ``T = S diag(theta)
    S^T`` and its new directions ``F``; returns the number of Ritz vectors kept."""
    kept = _keep_count(k, p, m, size)
    keep = order[:kept]
    kb.replace_leading(S[None, :, keep], size)
    Qn, Rn = kb.next_block(F, kept)
    couplings = Rn[0] @ S[last:size, keep]
    kb.T.zero_()
    kb.T[0, :kept, :kept] = torch.diag(theta[keep])
    kb.T[0, kept:kept + p, :kept] = couplings
    kb.T[0, :kept, kept:kept + p] = couplings.T
    kb.set_rows(kept, Qn)
    return kept


def _ritz_vectors(kb: KrylovBasis, Y: torch.Tensor, size: int, op) -> torch.Tensor:
    """``(n, r)`` Ritz vectors ``Q Y`` on the operator's device and dtype."""
    return kb.combine(Y[None], size, op.dtype)[0].T


def _checked(kb: KrylovBasis, Y: torch.Tensor, size: int, op, values: torch.Tensor,
             keep_vectors: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The Ritz vectors (``None`` unless ``keep_vectors``) and their true residuals.

    Without the vectors, they are formed and checked one at a time: at ``n ~ 1e9`` the
    ``k`` vectors beside the basis and one product's memory did not fit on the device
    (the 1.1B Hessian on an H200), while one vector does; the residuals are reported
    either way, since the check computes them."""
    if keep_vectors:
        vectors = _ritz_vectors(kb, Y, size, op)
        return vectors, residual_norms(op, values, vectors)
    return None, torch.cat([residual_norms(op, values[j:j + 1],
                                           _ritz_vectors(kb, Y[:, j:j + 1], size, op))
                            for j in range(Y.shape[1])])
