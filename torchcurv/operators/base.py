"""The torch-native linear-operator contract every curvature matrix implements.

A :class:`LinearOperator` here is a square, symmetric ``n x n`` matrix known only
through its products with vectors. Vectors are torch tensors on the operator's device
and of its dtype: ``(n,)`` for one vector, ``(n, m)`` for a block of ``m`` vectors.
Subclasses implement :meth:`_matmat` on validated ``(n, m)`` blocks; everything else
(shape checks, counting, the parameter-shaped form, dense materialisation) lives here
once.
"""

from __future__ import annotations

import cmath
from collections.abc import Sequence

import torch

from torchcurv.errors import OperatorInputError
from torchcurv.operators.counting import ProductCounter


class LinearOperator(ProductCounter):
    """Symmetric ``n x n`` linear operator acting on torch tensors.

    Attributes:
        shape: ``(n, n)``.
        dtype: dtype of the vectors the operator takes and returns.
        device: device of the vectors the operator takes and returns.
        num_matvecs: number of vectors multiplied so far (a block of ``m`` counts ``m``).
        num_calls: number of product calls so far (a block counts once; an empty
            ``(n, 0)`` block, answered without a product, not at all). Products inside
            ``with op.uncounted():`` are not counted
            (:class:`~torchcurv.operators.counting.ProductCounter`).

    Every product refuses vectors with NaN/inf entries
    (:class:`~torchcurv.OperatorInputError`), whatever the operator.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if n < 1:
            raise ValueError(f"an operator needs at least one row, got n={n}")
        self._n = int(n)
        self._dtype = dtype
        self._device = torch.device(device)

    # -- what subclasses provide ---------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A @ V`` for a validated block ``V`` of shape ``(n, m)``."""
        raise NotImplementedError

    # -- the contract --------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of rows (and columns): the selected parameter entries."""
        return self._n

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` of shape ``(n,)`` (or ``(n, 1)``, returned as ``(n, 1)``)."""
        v = self._check_input(v)
        if v.ndim == 2 and v.shape[1] != 1:
            raise OperatorInputError(
                f"matvec takes one vector of shape ({self._n},) or ({self._n}, 1), "
                f"got shape {tuple(v.shape)}; use matmat for blocks"
            )
        return self._apply(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for a block ``V`` of shape ``(n, m)``; returns ``(n, m)``."""
        V = self._check_input(V)
        if V.ndim != 2:
            raise OperatorInputError(
                f"matmat takes a block of shape ({self._n}, m), got shape {tuple(V.shape)}"
            )
        return self._apply(V)

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A^T @ v``, equal to :meth:`matvec` because the operator is symmetric."""
        return self.matvec(v)

    def rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A^T @ V``, equal to :meth:`matmat` because the operator is symmetric."""
        return self.matmat(V)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self._apply(self._check_input(other))

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - numpy/scipy spelling
        """The transpose: the operator itself (it is symmetric)."""
        return self

    def adjoint(self) -> LinearOperator:
        """The adjoint: the operator itself (it is real symmetric)."""
        return self

    H = property(adjoint)

    def to_dense(self, chunk_size: int = 256, max_n: int = 50_000) -> torch.Tensor:
        """Materialise the ``(n, n)`` matrix by multiplying blocks of identity columns.

        Args:
            chunk_size: identity columns per :meth:`matmat` call.
            max_n: refuse larger operators (an ``n x n`` matrix of that size rarely fits).
        """
        if self._n > max_n:
            raise ValueError(
                f"to_dense would build a {self._n} x {self._n} matrix; raise max_n to force it"
            )
        cols = []
        for start in range(0, self._n, chunk_size):
            stop = min(start + chunk_size, self._n)
            E = torch.zeros(self._n, stop - start, dtype=self._dtype, device=self._device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1)

    # -- helpers shared by subclasses ------------------------------------------------
    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        one = V.ndim == 1
        block = V.unsqueeze(1) if one else V
        if block.shape[1] == 0:
            # scipy's operators answer an empty block with an empty block; no product
            # happens, so nothing is counted
            return block.new_zeros(block.shape)
        out = self._finite_matmat(block, one)
        self._count(block.shape[1])
        return out.squeeze(1) if one else out

    def _finite_matmat(self, block: torch.Tensor, one: bool) -> torch.Tensor:
        """``A @ block`` for an ``(n, m)`` block, refusing one with NaN/inf entries
        (:class:`~torchcurv.OperatorInputError`) before any product. Operators whose
        product ends in a host read-back of its own override it to finish the check in
        that read-back (:class:`FiniteCheck`): on a GPU every read-back stalls the host
        until the device drains."""
        _check_finite(block, one)
        return self._matmat(block)

    def _check_input(self, V: torch.Tensor) -> torch.Tensor:
        return check_vector(V, self._n, self._dtype, self._device, type(self).__name__)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} n={self._n} dtype={self._dtype} device={self._device}>"


def check_vector(
    V: torch.Tensor, rows: int, dtype: torch.dtype, device: torch.device, who: str
) -> torch.Tensor:
    """``V`` if it is a ``(rows,)`` or ``(rows, m)`` tensor of ``dtype`` on ``device``,
    else an :class:`~torchcurv.OperatorInputError` that names the mismatch and the fix."""
    if not isinstance(V, torch.Tensor):
        raise OperatorInputError(
            f"{who} multiplies torch tensors, got {type(V).__name__}; "
            "for NumPy/SciPy use torchcurv.as_linear_operator(op)"
        )
    if V.ndim not in (1, 2) or V.shape[0] != rows:
        raise OperatorInputError(
            f"vector has shape {tuple(V.shape)}, the operator needs ({rows},) "
            f"or ({rows}, m)"
        )
    if V.dtype != dtype:
        raise OperatorInputError(
            f"vector has dtype {V.dtype}, the operator's dtype is {dtype}; "
            f"convert with v.to({dtype})"
        )
    if V.device != device and not _same_device(V.device, device):
        raise OperatorInputError(
            f"vector is on {V.device}, the operator is on {device}; "
            f"move it with v.to('{device}')"
        )
    return V


def _check_finite(block: torch.Tensor, one: bool) -> None:
    """Refuse NaN/inf in the vectors before any product, alike for every operator (a
    product would otherwise return NaN, or blame the loss)."""
    # one host read-back: a sum is finite only if every entry is (a sum that overflows
    # goes on to the entrywise check, which clears it)
    if not cmath.isfinite(block.sum().item()):
        _check_entries(block, one)


def _check_entries(block: torch.Tensor, one: bool) -> None:
    """The entrywise check after a sum of ``block`` that is not finite: raise the
    :class:`~torchcurv.OperatorInputError` that counts the NaN/inf entries (and names
    their columns), or return if there are none (the sum overflowed)."""
    if bool(torch.isfinite(block).all()):
        return
    bad = (~torch.isfinite(block)).sum(dim=0)
    columns = bad.nonzero().flatten().tolist()
    count = int(bad.sum())
    if one:
        what = f"the vector has {count} non-finite entries (NaN/inf)"
    else:
        shown = ", ".join(map(str, columns[:10])) + (", ..." if len(columns) > 10 else "")
        what = f"the vectors have {count} non-finite entries (NaN/inf) in column(s) [{shown}]"
    raise OperatorInputError(f"{what}; a product with them is undefined")


class FiniteCheck:
    """The NaN/inf check of a product's vectors, begun on the device and finished in the
    product's own host read-back (the curvature operators' loss check), so that the
    product reads back once instead of twice.

    :attr:`total` is the block's sum, a 0-d tensor on its device: finite only if every
    entry is. The product reads it with its other scalars and calls :meth:`refuse` when
    the values read are not all finite; :meth:`refuse` raises the error
    :func:`_check_finite` raises (input problems reported as input problems, ahead of
    any other), or returns if the entries are finite.
    """

    __slots__ = ("block", "one", "total")

    def __init__(self, block: torch.Tensor, one: bool) -> None:
        self.block = block
        self.one = one
        self.total = block.sum()

    def refuse(self) -> None:
        _check_entries(self.block, self.one)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # 'cuda' and 'cuda:0' name the same device when 0 is current.
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    index_a = a.index if a.index is not None else current
    index_b = b.index if b.index is not None else current
    return index_a == index_b


class ParameterOperator(LinearOperator):
    """A linear operator whose rows are indexed by the entries of a list of parameters.

    Adds the parameter-shaped form: a list of tensors shaped like ``params`` in and out
    (:meth:`matvec_params`), and :meth:`flatten` / :meth:`unflatten` between the two.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        params = list(params)
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1:
            raise TypeError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}")
        if len(devices) > 1:
            raise TypeError(f"parameters live on several devices {sorted(map(str, devices))}")
        self._shapes = [p.shape for p in params]
        self._sizes = [p.numel() for p in params]
        super().__init__(sum(self._sizes), params[0].dtype, params[0].device)
        # Shape-only meta tensors, from which torch cuts all of a vector's parameter views
        # in one call instead of a split and a view per parameter: a model with many
        # parameter tensors paid those on every product. A zero-size parameter would come
        # back shaped (0,), so such models keep the per-parameter views.
        self._view_plans: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        if all(self._sizes):
            self._view_plans = ([torch.empty(s, device="meta") for s in self._shapes],
                                [torch.empty((1, *s), device="meta") for s in self._shapes])

    def _param_views(self, flat: torch.Tensor, row: bool = False) -> list[torch.Tensor]:
        """Views of the ``(n,)`` tensor ``flat`` shaped like the parameters (``(1, *shape)``
        with ``row``), as ``split`` and ``view`` give them."""
        if self._view_plans is None:
            return [c.view((1, *s) if row else s) for c, s in zip(flat.split(self._sizes),
                                                                  self._shapes)]
        return list(torch._C._nn.unflatten_dense_tensors(flat, self._view_plans[row]))

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate parameter-shaped tensors into one ``(n,)`` vector."""
        tensors = list(tensors)
        if len(tensors) != len(self._shapes) or any(
            t.shape != s for t, s in zip(tensors, self._shapes)
        ):
            raise OperatorInputError(
                "expected tensors shaped like the parameters "
                f"{[tuple(s) for s in self._shapes]}, got {[tuple(t.shape) for t in tensors]}"
            )
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split an ``(n,)`` vector into views shaped like the parameters."""
        v = self._check_input(v)
        if v.ndim != 1:
            raise OperatorInputError(f"unflatten takes shape ({self._n},), got {tuple(v.shape)}")
        return self._param_views(v)

    def matvec_params(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``A @ v`` in the parameter-shaped form: a list shaped like the parameters."""
        return self.unflatten(self.matvec(self.flatten(tensors)))

    def _split_block(self, V: torch.Tensor, rows: bool = True) -> ParameterBlock:
        """Split ``(n, m)`` into per-parameter blocks of shape ``(m, *param.shape)``.

        A one-vector block also has its parameter-shaped vectors
        (:attr:`ParameterBlock.vectors`); without ``rows`` it has only those (no
        entries), for kernels that read nothing else: the views of a model with many
        parameter tensors cost a dispatched op each."""
        m = V.shape[1]
        if m == 1:
            # a column of a 2-D tensor is 1-D, so each piece views as any shape; a column
            # of a wider block is strided, and strided parameter-shaped views would make
            # every kernel of the product read them strided (or copy them, per use): one
            # contiguous copy of the column instead
            flat = V[:, 0]
            if flat.stride(0) != 1:
                flat = flat.contiguous()
            if self._view_plans is None:
                block = ParameterBlock(self._param_views(flat, row=True) if rows else ())
                block._vectors = self._param_views(flat)
            else:  # _param_views, inline: once per product
                vectors, row_plans = self._view_plans
                block = ParameterBlock(torch._C._nn.unflatten_dense_tensors(flat, row_plans)
                                       if rows else ())
                block._vectors = list(torch._C._nn.unflatten_dense_tensors(flat, vectors))
            return block
        return ParameterBlock(
            c.T.reshape(m, *s) for c, s in zip(V.split(self._sizes, dim=0), self._shapes)
        )

    def _join_block(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`_split_block`: per-parameter ``(m, *shape)`` to ``(n, m)``."""
        return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1).T


class ParameterBlock(list):
    """A block of ``m`` vectors as per-parameter tensors of shape ``(m, *param.shape)``.

    :attr:`vectors` gives a one-vector block as parameter-shaped tensors, made once per
    product instead of once per batch: the per-batch kernels of a matvec then index
    nothing (each view is a dispatched op, and a model with many parameter tensors
    pays them on every batch). A one-vector block made for kernels that read only
    :attr:`vectors` holds no entries (``ParameterOperator._split_block(V, rows=False)``).
    """

    _vectors: list[torch.Tensor] | None = None

    @property
    def vectors(self) -> list[torch.Tensor]:
        """The parameter-shaped tensors of a one-vector block (``m == 1``)."""
        if self._vectors is None:
            if self and self[0].shape[0] != 1:
                raise ValueError(f"a block of {self[0].shape[0]} vectors has no single vector")
            self._vectors = [b[0] for b in self]
        return self._vectors
