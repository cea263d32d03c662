"""The one (block) Lanczos recurrence that torchcurv's Krylov methods share.

:class:`KrylovBasis` holds ``b`` independent Krylov bases (``b = 1`` for the eigensolvers,
``b`` = number of probes for stochastic Lanczos quadrature, whose probes then share each
operator call) and the projected matrices ``T = Q^T A Q``. One step applies the operator
to a block of ``p`` basis vectors (``p = 1``: plain Lanczos; ``p > 1``: block Lanczos),
orthogonalizes the product against *every* stored basis vector with classical
Gram-Schmidt run twice (CGS2, which keeps the basis orthogonal to working precision
(Giraud et al. 2005), so no spurious copies of converged Ritz values appear) and turns it
into the next block with a Householder QR.

Layout and memory: the basis is a ``(b, m, n)`` tensor (basis vectors are rows, like
CuPy's ``(ncv, n)``) of ``basis_dtype`` on ``basis_device``; that is the peak memory,
``b * m * n * itemsize`` bytes, plus a few ``(b, p, n)`` work blocks on the operator's
device. Arithmetic runs on the operator's device in ``compute_dtype`` = the wider of the
operator's and the basis' dtypes, at least float64 for float32 operators and float32
for half-precision ones (:func:`_arithmetic_floor`). When the basis lives elsewhere or in
another dtype, it is streamed to the operator's device in column pieces (all stored
rows, a slice of the ``n`` coordinates) of at most ``CHUNK_BYTES``, so a host-resident
basis never needs device memory of its own size. Column pieces rather than whole rows:
at ``n ~ 1e9`` a single row in compute dtype is gigabytes, and converting the basis row
by row (each a gigabyte-sized copy, projection and update) made Gram-Schmidt several
times slower than the products it serves.
``T`` is float64 on the CPU (it is tiny).

Breakdown: when a new direction has (numerically) no component outside the basis, an
invariant subspace has been found; that direction is replaced by a random vector
orthogonal to the basis with zero coupling in ``T``. For eigensolvers this lets the
search continue into the rest of the space; for quadrature the decoupled part of ``T``
has Ritz vectors with zero first component, so it carries no weight.
"""

from __future__ import annotations

import math
import os

import torch

from torchcurv.algorithms.result import norms64
from torchcurv.operators.memory import basis_device as choose_basis_device

CHUNK_BYTES = 2**30
"""Largest piece of a streamed basis (host-resident or other-dtype) on the device at once."""

PIN_FRACTION = 0.6
"""Largest share of the host's memory a host-resident basis is page-locked for."""

SEGMENT = 2**16
"""Length of the pieces :func:`inner_products` cuts a long contraction into on CUDA."""


def inner_products(A: torch.Tensor, B: torch.Tensor, segment: int | None = None) -> torch.Tensor:
    """``A @ B^T`` over the last dimension: ``(..., p, n)`` and ``(..., c, n)`` give
    ``(..., p, c)``, the projections of Gram-Schmidt and Rayleigh-Ritz.

    Why not ``A @ B.mT``: when the contracted length ``n`` is the only long dimension
    (a few vectors against a few others), cuBLAS runs a matrix-vector kernel that reads
    the inputs well below the device's copy bandwidth (single-SM kernels are reported
    for such shapes, pytorch/pytorch#114911), and at language-model sizes every
    projection reads gigabytes. On CUDA the contraction is cut into ``segment``-long
    pieces (default :data:`SEGMENT`), multiplied as one batched product over the pieces
    (one piece per program, so every SM has work) and the partial sums added; the
    pieces are strided views of the inputs. Elsewhere, when ``n`` is under two pieces,
    or for one vector against one (where the plain product was faster), it is the plain
    product. Cost: one read of both inputs either way; the partials are
    ``(n / segment) x p x c``. ``benchmarks/lanczos_phases.py`` times both against the
    copy-bandwidth floor at the 1.1B model's size (``lanczos_phases_h200_f.jsonl``).
    """
    n = A.shape[-1]
    if segment is None:
        segment = SEGMENT if A.is_cuda else n
    pieces = n // max(segment, 1)
    if pieces < 2 or A.shape[-2] * B.shape[-2] <= 1:
        return A @ B.transpose(-1, -2)
    cut = pieces * segment
    out = A[..., cut:] @ B[..., cut:].transpose(-1, -2)
    lead = A.shape[:-2]
    A3 = A[..., :cut].reshape(-1, *A.shape[-2:-1], cut)
    B3 = B[..., :cut].reshape(-1, *B.shape[-2:-1], cut)
    partial = torch.stack([
        torch.bmm(a.unflatten(-1, (pieces, segment)).transpose(0, 1),
                  b.unflatten(-1, (pieces, segment)).transpose(0, 1).transpose(1, 2)).sum(0)
        for a, b in zip(A3, B3)
    ])
    return out + partial.reshape(*lead, *partial.shape[-2:])


def noise_margin(eps: float, margin: float) -> float:
    """``margin`` for a float32/float64 working precision ``eps``, 1 for half precision:
    the factor above ``eps ||A||`` (a product's rounding noise) below which a Lanczos
    coupling counts as noise.

    Why: a margin covers rounding accumulated in the working dtype, which matters at
    float32/64 eps; at bfloat16's, ``100 eps ||A||`` is 78 % of ``||A||``, so the
    recurrence threw away most genuine directions of a spectrum with a few large
    eigenvalues (and returned wrong ones) and SLQ cut every probe's rule after one node
    (test_lanczos, test_spectral: the bfloat16 operators).
    """
    return margin if eps < 1e-6 else 1.0


def _arithmetic_floor(dtype: torch.dtype) -> torch.dtype:
    """The narrowest dtype the recurrence computes in for an operator of ``dtype``.

    Float32 operators get float64 arithmetic: Gram-Schmidt in float32 leaves the basis
    orthogonal only to about ``sqrt(n) eps32``, and Ritz vectors formed from it then miss
    ``tol = 1e-6`` on models of 1e5 parameters and more (block Lanczos stagnates there);
    the extra cost is in the ``m x n`` basis arithmetic, small beside the products.
    Half-precision operators compute in float32: their products' own rounding is far
    above float32 arithmetic's, and their work blocks stay half the size.
    """
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _allocate_basis(shape: tuple[int, int, int], dtype: torch.dtype,
                    device: torch.device, op_device: torch.device) -> torch.Tensor:
    """The zeroed basis; in pinned (page-locked) host memory when it is kept on the host
    for a CUDA operator, so its pieces cross to the device by DMA at full link speed
    (pageable memory is staged through a driver buffer first). Pageable when the basis
    is more than :data:`PIN_FRACTION` of the host's memory (page-locking nearly all of
    it starves everything else on the host) or pinning fails."""
    if device.type == "cpu" and op_device.type == "cuda":
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if size <= PIN_FRACTION * _host_memory_bytes():
            try:
                return torch.zeros(shape, dtype=dtype, pin_memory=True)
            except RuntimeError:
                pass
    return torch.zeros(shape, dtype=dtype, device=device)


def _host_memory_bytes() -> int:
    """Physical host memory; 0 (so nothing is pinned) where the OS does not say
    (``os.sysconf`` is POSIX-only)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 0


class KrylovBasis:
    """``b`` orthonormal Krylov bases of up to ``m`` vectors of length ``n``, and ``T``.

    Args:
        op: the symmetric operator (torchcurv ``LinearOperator`` contract).
        b: number of independent bases (one per start vector/probe).
        m: basis vectors per basis (``ncv``).
        basis_dtype, basis_device: where the basis is stored (default: the operator's);
            ``basis_device="auto"``: the operator's device if the basis fits there beside
            one product, else host memory
            (:func:`torchcurv.operators.memory.basis_device`).
        generator: CPU generator for breakdown replacements (determinism).
    """

    def __init__(
        self,
        op,
        b: int,
        m: int,
        *,
        basis_dtype: torch.dtype | None = None,
        basis_device: torch.device | str | None = None,
        generator: torch.Generator,
    ) -> None:
        self.op = op
        self.b, self.m, self.n = b, m, op.n
        basis_dtype = op.dtype if basis_dtype is None else basis_dtype
        if not isinstance(basis_dtype, torch.dtype) or not basis_dtype.is_floating_point:
            raise TypeError(f"basis_dtype must be a floating torch.dtype, got {basis_dtype!r}")
        if basis_device == "auto":
            basis_device = choose_basis_device(op, b * m, basis_dtype, b)
        basis_device = op.device if basis_device is None else torch.device(basis_device)
        self.device = op.device
        self.compute_dtype = torch.promote_types(
            torch.promote_types(op.dtype, basis_dtype), _arithmetic_floor(op.dtype)
        )
        # The precision of the products and of the stored basis: what rounding leaves of a
        # direction, and the best relative residual a solve can be asked for.
        self.working_dtype = max(op.dtype, basis_dtype, key=lambda d: torch.finfo(d).eps)
        self.working_eps = torch.finfo(self.working_dtype).eps
        self.basis = _allocate_basis((b, m, self.n), basis_dtype, basis_device, self.device)
        self.T = torch.zeros(b, m, m, dtype=torch.float64)
        self.generator = generator
        self.anorm = 0.0  # running lower bound on ||A||, scales the breakdown test
        self._streamed = basis_dtype != self.compute_dtype or basis_device != self.device

    # -- moving the basis to where the arithmetic happens ----------------------------
    @property
    def basis_bytes(self) -> int:
        return self.basis.numel() * self.basis.element_size()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Basis rows ``[start, stop)`` as ``(b, stop - start, n)`` compute-dtype tensor."""
        return self.basis[:, start:stop].to(self.device, self.compute_dtype)

    def column_pieces(self, count: int, always: bool = False):
        """``(columns, Q)`` over the coordinates: ``Q`` is rows ``[0, count)`` restricted to
        the slice ``columns``, ``(b, count, width)`` in compute dtype on the operator's
        device, at most ``CHUNK_BYTES`` each. A basis that is not streamed comes as one
        piece, the stored rows themselves (no copy), unless ``always`` (callers that
        build a result of the basis' size piece by piece)."""
        if not (self._streamed or always):
            yield slice(0, self.n), self.basis[:, :count]
            return
        itemsize = torch.finfo(self.compute_dtype).bits // 8
        width = max(1, CHUNK_BYTES // (self.b * max(count, 1) * itemsize))
        for start in range(0, self.n, width):
            columns = slice(start, min(start + width, self.n))
            yield columns, self._piece(count, columns)

    def _piece(self, count: int, columns: slice) -> torch.Tensor:
        """Rows ``[0, count)`` at ``columns`` on the operator's device in compute dtype.

        From another device the piece is copied row by row: each row's slice is
        contiguous, so a pinned host basis goes by DMA, where copying the strided piece
        whole would first gather it into a pageable host buffer."""
        src = self.basis[:, :count, columns]
        if src.device == self.device:
            return src.to(self.compute_dtype)
        staged = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        for i in range(self.b):
            for r in range(count):
                staged[i, r].copy_(src[i, r], non_blocking=src.is_pinned())
        return staged.to(self.compute_dtype)

    def set_rows(self, start: int, block: torch.Tensor) -> None:
        self.basis[:, start:start + block.shape[1]] = block.to(self.basis.device,
                                                               self.basis.dtype)

    # -- the recurrence --------------------------------------------------------------
    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``A`` applied to every row of ``X`` (``(b, p, n)``) in one ``matmat``."""
        b, p, n = X.shape
        Y = self.op.matmat(X.reshape(b * p, n).T.to(self.op.dtype))
        Y = Y.T.reshape(b, p, n).to(self.compute_dtype)
        self.anorm = max(self.anorm, float(norms64(Y).max()))
        return Y

    def orthogonalize(self, W: torch.Tensor, count: int) -> torch.Tensor:
        """``W`` (``(b, p, n)``) minus its components along basis rows ``[0, count)``, in
        place (``W`` is returned).

        Classical Gram-Schmidt, twice (CGS2). Over column pieces that is three sweeps,
        the update of the first pass and the projection of the second sharing one: each
        piece of the basis is read three times per direction, and no temporary of the
        basis' or ``W``'s size is made.
        """
        if count == 0:
            return W
        coefficients = torch.zeros(self.b, W.shape[1], count, dtype=W.dtype, device=W.device)
        for columns, Q in self.column_pieces(count):
            coefficients += inner_products(W[..., columns], Q)
        again = torch.zeros_like(coefficients)
        for columns, Q in self.column_pieces(count):
            piece = W[..., columns]
            piece.baddbmm_(coefficients, Q, alpha=-1)
            again += inner_products(piece, Q)
        for columns, Q in self.column_pieces(count):
            W[..., columns].baddbmm_(again, Q, alpha=-1)
        return W

    def step(self, pos: int, p: int) -> torch.Tensor:
        """One block step from rows ``[pos, pos + p)``; returns the new directions.

        Sets the diagonal block ``T[pos:pos+p, pos:pos+p] = Q_j^T A Q_j`` and returns
        ``A Q_j`` orthogonalized against rows ``[0, pos + p)`` (``(b, p, n)``). The
        couplings to earlier rows (the tridiagonal or thick-restart arrow entries) are
        already in ``T``; orthogonalizing against all rows is the full
        reorthogonalization.
        """
        X = self.rows(pos, pos + p)
        W = self.apply(X)
        D = inner_products(X, W).double().cpu()
        self.T[:, pos:pos + p, pos:pos + p] = (D + D.transpose(1, 2)) / 2
        return self.orthogonalize(W, pos + p)

    def block_qr(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Householder ``W^T = Q^T R`` per basis, ``R`` with nonnegative diagonal.

        Returns ``Q`` (``(b, p, n)`` compute dtype), ``R`` (``(b, p, p)`` float64, CPU,
        upper triangular: ``W[j] = sum_i R[i, j] Q[i]``) and a ``(b, p)`` bool mask of
        numerically dependent columns (breakdown).
        """
        if W.shape[1] == 1:
            # One direction: QR is a normalisation. A Householder QR of an (n, 1) matrix
            # costs several cuSOLVER launches and syncs per Lanczos step for nothing.
            norm = W.norm(dim=-1, keepdim=True)
            R = norm.double().cpu()
            dependent = R[:, :, 0] <= self._breakdown_threshold()
            # dependent rows are rebuilt by next_block; keep them finite meanwhile
            return W / norm.clamp_min(torch.finfo(W.dtype).tiny), R, dependent
        Qt, R = torch.linalg.qr(W.transpose(1, 2))
        sign = torch.where(torch.diagonal(R, dim1=1, dim2=2) < 0, -1.0, 1.0).to(R.dtype)
        Qt, R = Qt * sign[:, None, :], R * sign[:, :, None]
        R = R.double().cpu()
        dependent = torch.diagonal(R, dim1=1, dim2=2) <= self._breakdown_threshold()
        return Qt.transpose(1, 2), R, dependent

    def _breakdown_threshold(self) -> float:
        # Directions below this are rounding noise of the products that made them.
        return noise_margin(self.working_eps, 100.0) * self.working_eps * max(self.anorm,
                                                                             1e-300)

    def next_block(self, W: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthonormal next block ``Q`` and coupling ``R`` (``W[j] = sum_i R[i, j] Q[i]``)
        from directions ``W`` (``(b, p, n)``) orthogonal to basis rows ``[0, count)``.

        Dependent directions (breakdown) become random unit vectors orthogonal to rows
        ``[0, count)`` and to the rest of the block, with zero coupling.
        """
        Q, R, dependent = self.block_qr(W)
        if not bool(dependent.any()):
            return Q, R
        if count + W.shape[1] > self.n:
            raise RuntimeError(
                f"a Krylov basis of {count} vectors cannot grow by {W.shape[1]} in n={self.n}"
            )
        # Rare path: Householder Q columns after a dependent one need not stay orthogonal
        # to the basis, so redo the block column by column.
        Q, R = torch.zeros_like(W), torch.zeros_like(R)
        threshold = self._breakdown_threshold()
        for i in range(self.b):
            for j in range(W.shape[1]):
                v = W[i, j]
                for _ in range(2):
                    c = inner_products(v[None], Q[i, :j])[0]
                    v = v - c @ Q[i, :j]
                    R[i, :j, j] += c.double().cpu()
                r = float(norms64(v))
                if r <= threshold:
                    R[i, j, j] = 0.0
                    Q[i, j] = self._random_orthogonal(i, count, Q[i, :j])
                else:
                    R[i, j, j] = r
                    Q[i, j] = v / r
        return Q, R

    def _random_orthogonal(self, i: int, count: int, others: torch.Tensor) -> torch.Tensor:
        """A random unit vector orthogonal to rows ``[0, count)`` of basis ``i`` and to
        the rows of ``others``."""
        z = torch.randn(self.n, dtype=torch.float64, generator=self.generator)
        full = torch.zeros(self.b, 1, self.n, dtype=self.compute_dtype, device=self.device)
        full[i, 0] = z.to(self.device, self.compute_dtype)
        for _ in range(2):
            full = self.orthogonalize(full, count)
            full[i, 0] -= inner_products(full[i, :1], others)[0] @ others
        v = full[i, 0]
        return v / v.norm()

    def extend(self, pos: int, stop: int, p: int) -> tuple[int, torch.Tensor]:
        """Block Lanczos steps from the block at rows ``[pos, pos + p)``.

        Steps while the next block fits below row ``stop``, storing each new block and
        its coupling ``R`` in ``T``. Returns the position of the last block stepped from
        and its (unstored) new directions ``F`` (``(b, p, n)``), which satisfy
        ``A Q = Q T + F E^T`` with ``Q`` the rows ``[0, last + p)``.
        """
        while True:
            F = self.step(pos, p)
            if pos + 2 * p > stop:
                return pos, F
            Q, R = self.next_block(F, pos + p)
            self.set_rows(pos + p, Q)
            self.T[:, pos + p:pos + 2 * p, pos:pos + p] = R
            self.T[:, pos:pos + p, pos + p:pos + 2 * p] = R.transpose(1, 2)
            pos += p

    # -- combining basis vectors -----------------------------------------------------
    def combine(self, Y: torch.Tensor, count: int,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Y^T Q`` for coefficients ``Y`` (``(b, count, r)``): ``(b, r, n)`` on the
        operator's device in ``dtype`` (default: compute dtype), the Ritz vectors.

        Built piece by piece straight into the result, so the only large allocation is
        the result itself (at ``n ~ 1e9`` and ``r = 10`` a compute-dtype intermediate
        would be tens of gigabytes beside the basis).
        """
        Yt = Y.transpose(1, 2).to(self.device, self.compute_dtype)
        out = torch.empty(self.b, Y.shape[2], self.n, device=self.device,
                          dtype=self.compute_dtype if dtype is None else dtype)
        for columns, Q in self.column_pieces(count, always=True):
            out[..., columns] = Yt @ Q
        return out

    def replace_leading(self, Y: torch.Tensor, count: int) -> None:
        """Rows ``[0, r)`` become ``Y^T`` rows ``[0, count)`` (thick restart), in place.

        Works on column slices so no second basis-sized tensor is ever allocated.
        """
        r = Y.shape[2]
        Yt = Y.transpose(1, 2).to(self.device, self.compute_dtype)
        for columns, Q in self.column_pieces(count, always=True):
            self.basis[:, :r, columns] = (Yt @ Q).to(self.basis.device, self.basis.dtype)
