"""Kronecker-factored curvature: KFAC, EKFAC and the exact inverse of damped KFAC.

KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions; Eschenhagen et al.
2023 for weight sharing) approximates each layer's block of the GGN / Fisher by one
Kronecker product and drops the blocks between layers. For a layer ``z = W a (+ b)``,
with ``a`` its input and ``g`` the gradient of the loss with respect to its output ``z``:

- ``A = 1/N sum_n 1/S sum_s a_ns a_nsᵀ`` (the input covariance; ``N`` examples, ``S``
  shared positions per example: tokens of a sequence, output locations of a
  convolution, where ``a`` is the patch);
- ``B = sum_n sum_s g_ns g_nsᵀ``, with ``g`` the backpropagated columns of the output
  space factor of the data set's loss (see ``fisher_type``), so that ``B`` carries the
  loss's ``1/(number of loss terms)`` for ``reduction="mean"``;
- the block of ``vec(W)`` (row-major, torchcurv's flattening) is ``B ⊗ A``: the product
  with a weight-shaped ``M`` is ``B M A``. A bias alone has ``B`` (its ``A`` is ``[1]``);
  with ``separate_weight_and_bias=False``, ``[W, b]`` is one block ``B ⊗ A'`` with ``a'``
  the input with a 1 appended.

``kfac_approx="reduce"`` first averages ``a`` and sums ``g`` over the ``S`` shared
positions of each example (Eschenhagen et al. 2023); ``"expand"`` treats every position
as an example. Without weight sharing both are the same.

EKFAC (George et al. 2018) keeps KFAC's eigenbasis ``Q_B ⊗ Q_A`` and replaces the
eigenvalues ``λ_B,i λ_A,j`` by the second moments of the per-example gradients in that
basis, ``sum_n (Q_Bᵀ G_n Q_A)_ij²``: the best diagonal in the basis (in Frobenius norm)
for the Fisher of per-example gradients.

Everything is computed from the factors: products (two small matmuls per layer, batched
over the layers of equal shapes), eigenvalues and eigenvectors, trace, (log-)determinant
and the inverse, with no Krylov method. Construction walks the data once (twice for
EKFAC), with one forward pass and ``S`` backward passes to the layer outputs per batch
(``S = mc_samples`` for "mc", 1 for "empirical", the output width for "type-2");
products never touch the model or the data.

Conventions are curvlinops 3.0.1's (``KFACLinearOperator``, ``EKFACLinearOperator``,
``KFACInverseLinearOperator``), with the differences torchcurv's Fisher operators have
(:mod:`torchcurv.operators.fisher`): loss terms are counted as the criterion counts them,
so ``ignore_index`` and class weights are exact (curvlinops divides by the row count),
and the type-2 / Monte-Carlo factors include class weights and ``pos_weight``.
``N`` counts the rows of ``X`` for ``(X, y)`` batches (curvlinops' ``num_data``), else
the leading dimension of the model output. docs/kfac.md has the mapping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from torchcurv.algorithms.probing import check_choice
from torchcurv.algorithms.solve import check_damping
from torchcurv.distributed.reduce import all_reduce_sum, checkpoint
from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import NonFiniteLossError
from torchcurv.losses.fisher import SAMPLEABLE, empirical_fisher_factors, monte_carlo_fisher_factors
from torchcurv.losses.hessian_sqrt import LossHessianSqrt
from torchcurv.objectives import Objective, counts_criterion_terms
from torchcurv.operators.base import ParameterOperator
from torchcurv.operators.config import CurvatureConfig, KFACConfig, snapshot
from torchcurv.operators.curvature import BatchLosses, CurvatureOperator
from torchcurv.operators.fisher import SeededDraws
from torchcurv.operators.jacobian import forward_with_graph
from torchcurv.operators.model_guard import preserved

Batch = Any
FisherType = Literal["mc", "empirical", "type-2"]
FISHER_TYPES: tuple[FisherType, ...] = get_args(FisherType)
KFACApprox = Literal["expand", "reduce"]
KFAC_APPROXES: tuple[KFACApprox, ...] = get_args(KFACApprox)
DampingMode = Literal["factors", "heuristic", "exact"]
DAMPING_MODES: tuple[DampingMode, ...] = get_args(DampingMode)
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
# per block (λ_B, Q_B, λ_A, Q_A); λ_A, Q_A are None for a bias alone
_Eigh = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class KroneckerFactor:
    """One Kronecker block ``B ⊗ A`` of :class:`KFACOperator`.

    Attributes:
        layer: the module's name in the model.
        params: the names of the parameters the block covers (weight first; both for a
            joint weight-and-bias block).
        input_covariance: ``A``, ``(c, c)`` with ``c`` the weight's entries per output
            (plus 1 for a joint block); ``None`` for a bias alone (its ``A`` is ``[1]``).
        gradient_covariance: ``B``, ``(d_out, d_out)``.
    """

    layer: str
    params: tuple[str, ...]
    input_covariance: torch.Tensor | None
    gradient_covariance: torch.Tensor


@dataclass(frozen=True)
class KroneckerEigenpairs:
    """Eigenpairs of a Kronecker-factored operator, from its factors.

    Attributes:
        eigenvalues: ``(k,)`` float64 on the CPU, ascending (as ``eigsh`` returns them).
        eigenvectors: ``(n, k)`` on the operator's device, column ``i`` for
            ``eigenvalues[i]``; orthonormal.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


@dataclass(frozen=True)
class _Slot:
    """Where one Kronecker block sits: its parameters and their columns in ``[W, b]``."""

    layer: str
    indices: tuple[int, ...]
    widths: tuple[int, ...]
    weight: bool  # whether the block has an input factor (a weight in it)


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    weight: int | None  # index into the operator's params
    bias: int | None
    d_out: int


@dataclass(frozen=True)
class _Group:
    """Layer blocks of equal shapes, their matrices stacked: ``left`` ``(k, d, d)``,
    ``right`` ``(k, c, c)`` or ``None``, ``scale`` ``(k, d, c)`` or ``None``."""

    left: torch.Tensor
    right: torch.Tensor | None
    scale: torch.Tensor | None

    @property
    def block(self) -> tuple[int, int, int]:
        k, d, _ = self.left.shape
        return k, d, 1 if self.right is None else self.right.shape[1]

    def apply(self, M: torch.Tensor) -> torch.Tensor:
        """The group's map on ``(k, d, c)`` (one vector) or ``(k, d, c, m)``."""
        L, R, S = self.left, self.right, self.scale
        if S is None:
            out = _left(L, M)
            return out if R is None else _right(out, R)
        assert R is not None  # formed without scale in _Blocks.of
        T = _right(_left(L.mT, M), R)
        T = _left(L, T * (S if M.ndim == 3 else S[..., None]))
        return _right(T, R.mT)


class _Layout:
    """Where each layer's block sits: layers of equal block shapes, with the same blocks
    in the same order, form a group whose matrices are stacked ``(k, ...)``.

    A layer's block acts on its parameters' entries as one ``(d_out, c)`` matrix
    ``[W, b]`` (the weight's columns, then a 1-column bias, in the operator's parameter
    order). A weight and its separate bias share ``B``, and their layer's input-side
    matrix is ``blockdiag(A, [1])`` (the bias has no input factor), so ``[B W A, B b]``
    is one product per layer, exactly the two blocks'. ``perm`` gathers a vector's
    entries into group order (``None`` where that is already the parameters' order).
    """

    def __init__(self, op: KFACOperator) -> None:
        slots = op._slots
        units: dict[str, list[int]] = {}
        for j, slot in enumerate(slots):
            units.setdefault(slot.layer, []).append(j)
        starts = [0]
        for size in op._sizes:
            starts.append(starts[-1] + size)
        grouped: dict[tuple, list[list[int]]] = {}
        for js in units.values():
            pattern = tuple((slots[j].widths, slots[j].weight) for j in js)
            d = op._shapes[slots[js[0]].indices[0]][0]
            grouped.setdefault((d, pattern), []).append(js)
        self.slots = slots
        self.members = list(grouped.values())  # per group, per layer its slots
        self.keys = list(grouped)
        # per group, per block of the pattern: its columns in the layer's block
        self.columns: list[list[tuple[int, int]]] = []
        self.place: dict[str, tuple[int, int]] = {}  # layer -> (group, position)
        indices = []
        for g, ((d, pattern), members) in enumerate(grouped.items()):
            cols, col = [], 0
            for widths, _ in pattern:
                cols.append((col, col + sum(widths)))
                col += sum(widths)
            self.columns.append(cols)
            for pos, js in enumerate(members):
                self.place[slots[js[0]].layer] = (g, pos)
            # where each entry of the stacked (k, d, c) blocks sits in the vector: host
            # bookkeeping (numpy: no tensor operations), one transfer for the whole gather
            by_block = list(zip(*members))
            pieces = [np.array([starts[slots[j].indices[q]] for j in js])[:, None, None]
                      + np.arange(d * w).reshape(1, d, w)
                      for js in by_block for q, w in enumerate(slots[js[0]].widths)]
            indices.append(np.concatenate(pieces, axis=2).reshape(-1))
        perm = np.concatenate(indices)
        self.perm = (None if np.array_equal(perm, np.arange(perm.size))
                     else torch.from_numpy(perm).to(op.device))
        self.sizes = [len(members) * d * sum(w for widths, _ in pattern for w in widths)
                      for (d, pattern), members in grouped.items()]

    def width(self, g: int) -> int:
        return self.columns[g][-1][1]

    def has_input_factor(self, g: int) -> bool:
        return any(weight for _, weight in self.keys[g][1])

    def weight_columns(self, layer: str) -> tuple[int, int]:
        """The columns of ``layer``'s weight (with a joint bias) in its block."""
        g, _ = self.place[layer]
        return next(cols for cols, (_, weight) in zip(self.columns[g], self.keys[g][1])
                    if weight)

    def pad_input_side(self, g: int, R: torch.Tensor) -> None:
        """The 1 of each separate bias on the diagonal of the stacked ``R``, in place."""
        for (a, _), (_, weight) in zip(self.columns[g], self.keys[g][1]):
            if not weight:  # a bias: one column
                R[:, a, a].fill_(1)


class _Blocks:
    """The block-diagonal map of a Kronecker-factored operator, one block per layer
    (:class:`_Layout`): ``M -> left M right`` (``right is None``: ``left M``) or, with
    ``scale``, the eigenbasis form ``M -> Q_B ((Q_Bᵀ M Q_A) * scale) Q_Aᵀ``
    (``left = Q_B``, ``right = Q_A``, ``scale`` ``(d_out, c)``).

    Each group's matrices are stacked once, so a product is two batched matmuls per
    group (four in the eigenbasis form), not per layer: on a GPU, at these sizes, the
    time of a product is mostly the host's issuing of operations. The vector's entries
    go into group order with one precomputed gather and come back with one scatter.
    """

    def __init__(self, layout: _Layout, groups: list[_Group]) -> None:
        self.layout, self.groups = layout, groups
        self.dtype = groups[0].left.dtype

    @classmethod
    def of(cls, layout: _Layout, left: Sequence[torch.Tensor],
           right: Sequence[torch.Tensor | None],
           scale: Sequence[torch.Tensor] | None = None) -> _Blocks:
        """From per-block lists (one entry per :class:`_Slot`; a weight and its separate
        bias share ``left``). A layer with a bias alone in the eigenbasis form is formed
        once as ``Q_B diag(scale) Q_Bᵀ``: one matmul instead of four."""
        groups = []
        for g, members in enumerate(layout.members):
            by_block = list(zip(*members))  # per block of the pattern, its slots
            L = _stacked([left[js[0]] for js in members])
            R: torch.Tensor | None = None
            if len(by_block) == 1 and layout.has_input_factor(g):
                R = _stacked([_present(right[j]) for j in by_block[0]])
            elif layout.has_input_factor(g):
                c = layout.width(g)
                R = L.new_zeros(len(members), c, c)
                layout.pad_input_side(g, R)
                for block, (a, b) in zip(by_block, layout.columns[g]):
                    if layout.slots[block[0]].weight:
                        R[:, a:b, a:b].copy_(_stacked([_present(right[j]) for j in block]))
            S = None if scale is None else (
                _stacked([scale[j] for j in by_block[0]]) if len(by_block) == 1 else
                torch.cat([_stacked([scale[j] for j in js]) for js in by_block], dim=2))
            if R is None and S is not None:
                L, S = torch.bmm(L * S[:, None, :, 0], L.mT), None
            groups.append(_Group(L, R, S))
        return cls(layout, groups)

    def slot_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Per block ``left`` and ``right`` as views of the stacks (``right`` ``None``
        for a bias alone; blocks of one layer share one ``left`` tensor), so that a
        caller need not keep a second copy."""
        layout = self.layout
        left: list[torch.Tensor] = [torch.empty(0)] * len(layout.slots)
        right: list[torch.Tensor | None] = [None] * len(layout.slots)
        for group, members, columns in zip(self.groups, layout.members, layout.columns):
            lefts = group.left.unbind(0)
            rights = group.right.unbind(0) if group.right is not None else None
            for pos, js in enumerate(members):
                for j, (a, b) in zip(js, columns):
                    left[j] = lefts[pos]
                    if layout.slots[j].weight and rights is not None:
                        R = rights[pos]
                        right[j] = R if b - a == R.shape[0] else R[a:b, a:b]
        return left, right

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``V -> blockdiag(...) V`` for an ``(n, m)`` block ``V``: a gather, per group
        two (four) batched matmuls, a concatenation and a scatter. One vector goes
        through ``(k, d, c)`` stacks: without the vector axis there are no reshapes and
        transposes around the matmuls."""
        m = V.shape[1]
        perm, sizes = self.layout.perm, self.layout.sizes
        X = V if perm is None else V.index_select(0, perm)
        pieces = X.split(sizes) if len(sizes) > 1 else (X,)
        outs = []
        for group, piece in zip(self.groups, pieces):
            k, d, c = group.block
            if m == 1:  # the batched matmul's result is contiguous: a view
                outs.append(group.apply(piece.view(k, d, c)).view(-1, 1))
            else:
                outs.append(group.apply(piece.view(k, d, c, m)).reshape(-1, m))
        Y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return Y if perm is None else torch.empty_like(Y).index_copy_(0, perm, Y)


def _stacked(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(k, ...)`` from ``k`` equal-shaped tensors; a view for ``k = 1``."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(list(ts))


def _present(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None  # the group's pattern says which blocks have one
    return t


def _in_factor_dtype(op: ParameterOperator, blocks: _Blocks, V: torch.Tensor) -> torch.Tensor:
    """``blocks.matmat(V)`` in the factors' dtype, returned in ``op``'s."""
    dtype = blocks.dtype
    out = blocks.matmat(V if V.dtype == dtype else V.to(dtype))
    return out if out.dtype == op.dtype else out.to(op.dtype)


def _left(L: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Stacked ``L`` ``(k, d', d)`` applied to the second axis of ``(k, d, c)`` or
    ``(k, d, c, m)``: one batched matmul."""
    if T.ndim == 3:
        return torch.bmm(L, T)
    k, d, c, m = T.shape
    return torch.bmm(L, T.reshape(k, d, c * m)).view(k, L.shape[1], c, m)


def _right(T: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``(k, d, c)`` or ``(k, d, c, m)`` times stacked ``R`` ``(k, c, c')`` over its third
    axis: one batched matmul."""
    if T.ndim == 3:
        return torch.bmm(T, R)
    k, d, c, m = T.shape
    out = torch.bmm(T.transpose(2, 3).reshape(k, d * m, c), R)
    return out.view(k, d, m, -1).transpose(2, 3)


class KFACOperator(SeededDraws, CurvatureOperator):
    """KFAC: a block-diagonal, Kronecker-factored approximation of the GGN / Fisher.

    Supports ``nn.Linear`` (inputs ``(N, ..., d_in)``: every middle axis is shared) and
    ``nn.Conv2d`` (zero padding; groups averaged as curvlinops does) layers, with the
    losses ``CrossEntropyLoss``, ``MSELoss`` and ``BCEWithLogitsLoss`` (``"mean"`` or
    ``"sum"``). Every selected parameter must be a weight or bias of such a layer, used by
    that layer only; others raise a ``TypeError`` naming them (select with ``params=`` /
    ``param_filter=``). The math and the mapping to curvlinops: docs/kfac.md.

    Args:
        model, criterion, data, params, param_filter, check_deterministic,
            process_group, distributed, debug_distributed, microbatch_size: as for
            :class:`~torchcurv.CurvatureOperator`. Distributed, each rank walks its shard
            and the factors are summed with one all-reduce at construction; products
            then need no communication.
        fisher_type: the output-space factor backpropagated for ``B``:

            - ``"mc"`` (default): gradients of the loss at labels drawn from the model's
              predictive distribution, ``mc_samples`` per sample (the Monte-Carlo
              Fisher's draws, :class:`~torchcurv.MCFisherOperator`);
            - ``"empirical"``: the gradient of the loss at the data's labels;
            - ``"type-2"``: the columns of the loss Hessian's square root (exact in
              expectation; one backward pass per output entry of a sample).
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for shared weights.
        mc_samples: labels drawn per sample (``fisher_type="mc"`` only).
        seed, generator, per_batch_seeds: the Monte-Carlo draws, as for
            :class:`~torchcurv.MCFisherOperator` (curvlinops' default seed is
            2147483647; pass the same seed to both to compare).
        separate_weight_and_bias: one block per parameter (default, curvlinops'
            default) or one joint ``[W, b]`` block per layer.

    Attributes:
        factors: the :class:`KroneckerFactor` blocks, in parameter order.
        num_examples: ``N``, the examples the input covariances average over.

    Example:
        For one linear layer and one example per batch, KFAC is exact; with the
        type-2 Fisher it is the GGN:

        >>> import torch, torchcurv
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2).double()
        >>> data = [(torch.randn(1, 3, dtype=torch.float64),
        ...          torch.randn(1, 2, dtype=torch.float64))]
        >>> K = torchcurv.KFACOperator(model, nn.MSELoss(), data, fisher_type="type-2",
        ...                            separate_weight_and_bias=False)
        >>> G = torchcurv.GGNOperator(model, nn.MSELoss(), data)
        >>> torch.allclose(K.to_dense(), G.to_dense())
        True
    """

    config_type = KFACConfig

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        fisher_type: FisherType = "mc",
        kfac_approx: KFACApprox = "expand",
        mc_samples: int = 1,
        seed: int = 0,
        generator: torch.Generator | None = None,
        per_batch_seeds: bool | None = None,
        separate_weight_and_bias: bool = True,
        # Any rather than Unpack[CurvatureOptions], as for HessianOperator
        **options: Any,
    ) -> None:
        self._build(KFACConfig.of(
            type(self).__name__, model, criterion, data, fisher_type=fisher_type,
            kfac_approx=kfac_approx, mc_samples=mc_samples, seed=seed,
            generator=snapshot(generator), per_batch_seeds=per_batch_seeds,
            separate_weight_and_bias=separate_weight_and_bias, **options))

    def _build(self, config: CurvatureConfig) -> None:
        assert isinstance(config, KFACConfig)
        fisher_type, mc_samples = config.fisher_type, config.mc_samples
        check_choice(fisher_type, FISHER_TYPES, "fisher_type")
        check_choice(config.kfac_approx, KFAC_APPROXES, "kfac_approx")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(
                f"mc_samples={mc_samples} with fisher_type={fisher_type!r}: only the "
                "Monte-Carlo Fisher draws samples; leave mc_samples=1"
            )
        # products are matrix products of the factors: nothing to compile, record or split
        if config.compile:
            raise ValueError(f"{type(self).__name__} has no derivative to compile "
                             "(its products multiply the Kronecker factors); drop compile")
        if config.max_memory not in ("auto", None):
            raise ValueError(
                f"{type(self).__name__}'s products hold nothing but the factors and the "
                "vectors, so max_memory has nothing to bound; drop it")
        self.fisher_type = fisher_type
        self.kfac_approx = config.kfac_approx
        self.mc_samples = mc_samples
        self.separate_weight_and_bias = bool(config.separate_weight_and_bias)
        self.seed = int(config.seed)
        super()._build(config)
        self._init_draws(config.generator, config.per_batch_seeds)
        crit = self.objective.criterion
        if fisher_type != "empirical" and (
                not isinstance(crit, SAMPLEABLE) or self.objective.targets is None):
            raise TypeError(
                f"fisher_type={fisher_type!r} needs a criterion with a known predictive "
                f"distribution ({[c.__name__ for c in SAMPLEABLE]}), got "
                f"{type(crit).__name__ if crit is not None else 'an Objective without one'}"
                "; fisher_type='empirical' works with any objective"
            )
        self.factor_dtype = accumulation_dtype(self.dtype)
        self._mc_normaliser = self._cross_entropy_normaliser()
        with self._stage(None):
            self._layers = self._find_layers()
            self._slots = self._make_slots()
            self._layout = _Layout(self)
        # the factors are accumulated in the product's stacks: one copy of them
        self._factor_blocks, self.num_examples = self._compute_factors()
        self._factor_views: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None = None
        self._eig: list[_Eigh] | None = None

    def _cross_entropy_normaliser(self) -> float | None:
        """The data set loss's denominator for a Monte-Carlo cross-entropy whose batch
        shares are the criterion's own counts over it (``supervised``'s objective for a
        mean, any objective summing a summed criterion): the drawn gradients' row
        weights then come straight from it rather than per batch as the batch's
        weights times its share. ``None`` otherwise."""
        crit, objective = self.objective.criterion, self.objective
        if self.fisher_type != "mc" or not isinstance(crit, nn.CrossEntropyLoss):
            return None
        if crit.reduction == "sum" and objective.reduction == "sum":
            return 1.0
        if (crit.reduction == "mean" and objective.reduction == "mean"
                and counts_criterion_terms(objective)):
            return self.total_weight
        return None

    # -- layers and blocks -----------------------------------------------------------
    def _find_layers(self) -> list[_Layer]:
        index = {id(p): i for i, p in enumerate(self.params)}
        owners: dict[int, list[str]] = {}
        for mname, module in self.model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is not None and id(p) in index:
                    owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
        shared = [names for names in owners.values() if len(set(names)) > 1]
        if shared:
            raise TypeError(
                f"parameters shared between modules ({shared[:3]}): KFAC has one factor "
                "pair per layer; exclude them with params= / param_filter="
            )
        layers: list[_Layer] = []
        covered: set[int] = set()
        for mname, module in self.model.named_modules():
            if not isinstance(module, SUPPORTED_LAYERS):
                continue
            w, b = (index.get(id(getattr(module, k))) if getattr(module, k, None) is not None
                    else None for k in ("weight", "bias"))
            if w is None and b is None:
                continue
            if isinstance(module, nn.Conv2d):
                _check_conv(mname, module)
            d_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            layers.append(_Layer(mname, module, w, b, d_out))
            covered.update(i for i in (w, b) if i is not None)
        outside = [self.param_names[i] for i in range(len(self.params)) if i not in covered]
        if outside:
            shown = ", ".join(outside[:8]) + (", ..." if len(outside) > 8 else "")
            raise TypeError(
                f"KFAC supports the weights and biases of nn.Linear and nn.Conv2d layers; "
                f"these selected parameters are outside them: [{shown}]. Exclude them with "
                "params= or param_filter="
            )
        return layers

    def _make_slots(self) -> list[_Slot]:
        slots = []
        for layer in self._layers:
            w, b = layer.weight, layer.bias
            if w is not None:
                width = self.params[w].numel() // self.params[w].shape[0]
            if w is not None and b is not None and not self.separate_weight_and_bias:
                slots.append(_Slot(layer.name, (w, b), (width, 1), True))
                continue
            if w is not None:
                slots.append(_Slot(layer.name, (w,), (width,), True))
            if b is not None:
                slots.append(_Slot(layer.name, (b,), (1,), False))
        order = sorted(range(len(slots)), key=lambda j: slots[j].indices[0])
        return [slots[j] for j in order]

    def _joint(self, layer: _Layer) -> bool:
        return (not self.separate_weight_and_bias and layer.weight is not None
                and layer.bias is not None)

    # -- the passes over the data ----------------------------------------------------
    def _walk(self, on_inputs: Callable[[_Layer, torch.Tensor], Any],
              on_grads: Callable[[_Layer, Any, torch.Tensor, float], None],
              keep_inputs: bool = False) -> tuple[BatchLosses, float]:
        """One pass over this rank's data with hooks on the layers.

        Per batch (or microbatch): ``on_inputs(layer, x)`` for each call of a layer
        (``x`` its input rows: ``(N_l, ..., c)`` for the weight, every middle axis shared,
        ``c`` with a 1 appended for a joint block, patches for a convolution), then per
        backpropagated vector ``on_grads(layer, kept, g, weight)`` with ``g``
        ``(N_l, ..., d_out)`` the gradient of that vector at the layer's output and
        ``kept`` what ``on_inputs`` returned for that call with ``keep_inputs`` (so work
        on the inputs happens once per batch, not once per vector), else ``None``: the
        inputs are released once ``on_inputs`` has seen them. Returns the batches'
        losses and the examples.
        """
        losses = BatchLosses()
        examples = 0.0
        inputs: dict[str, list[torch.Tensor]] = {}
        outputs: dict[str, list[torch.Tensor | _Edge]] = {}

        def pre_hook(layer: _Layer):
            def hook(module, args):
                if layer.weight is not None:  # a bias alone has no input factor
                    with torch.no_grad():
                        inputs.setdefault(layer.name, []).append(self._layer_input(layer, args))
            return hook

        def post_hook(layer: _Layer):
            def hook(module, args, output):
                stock = (type(module).forward in _STOCK_FORWARDS
                         and "forward" not in module.__dict__)
                edge = _output_edge(output, stock)
                if edge is not None:
                    outputs.setdefault(layer.name, []).append(edge)
                    return None
                if not output.requires_grad:  # nothing upstream requires grad
                    output = output.detach().requires_grad_(True)
                outputs.setdefault(layer.name, []).append(output)
                # a clone downstream: in-place activations then leave `output` itself
                # untouched, so its gradient is the layer output's
                return output.clone()
            return hook

        rng = None if self.per_batch_seeds else self.fresh_generator()
        current = None
        with ExitStack() as stack, torch.enable_grad():
            stack.enter_context(preserved(self.model, guard=self._guard))
            for layer in self._layers:
                stack.callback(layer.module.register_forward_pre_hook(pre_hook(layer)).remove)
                stack.callback(layer.module.register_forward_hook(post_hook(layer)).remove)
            for i, batch, scale in self._batches():
                if self.fisher_type == "mc" and self.per_batch_seeds and i != current:
                    rng, current = self.batch_generator(self.batch_offset + i), i
                inputs.clear()
                outputs.clear()
                output = forward_with_graph(self.model, self.objective, batch)
                examples += _num_examples(batch, output)
                loss, vectors, weight = self._backprop_vectors(output, batch, scale, rng)
                losses.add(i, loss)
                with torch.no_grad():  # the inputs are kept in the graph, not detached
                    for layer in self._layers:
                        xs = inputs.get(layer.name, [])
                        for k, x in enumerate(xs):
                            kept = on_inputs(layer, x)
                            if keep_inputs:
                                xs[k] = kept
                if not keep_inputs:
                    inputs.clear()
                kept_outputs = [t for layer in self._layers for t in outputs.get(layer.name, [])]
                edges = [t.edge if isinstance(t, _Edge) else get_gradient_edge(t)
                         for t in kept_outputs]
                count = len(vectors)
                for s, u in enumerate(vectors):
                    grads = torch.autograd.grad(output, edges, grad_outputs=u(),
                                                retain_graph=s < count - 1, allow_unused=True)
                    pos = 0
                    for layer in self._layers:
                        xs = inputs.get(layer.name, [])
                        for k in range(len(outputs.get(layer.name, []))):
                            g, kept_output = grads[pos], kept_outputs[pos]
                            pos += 1
                            if g is not None:
                                if (isinstance(kept_output, _Edge)
                                        and g.shape != kept_output.shape):
                                    g = g.reshape(kept_output.shape)
                                kept = xs[k] if k < len(xs) else None
                                with torch.no_grad():
                                    on_grads(layer, kept, self._layer_grad(layer, g), weight)
                inputs.clear()
                outputs.clear()
        return losses, examples

    def _backprop_vectors(self, output: torch.Tensor, batch: Batch, scale, rng):
        """The batch's loss, the output-space vectors to backpropagate (as thunks, so
        that type-2's columns are built one at a time) and their common weight."""
        output_d = output.detach()
        if self.fisher_type == "empirical":
            weight = scale * self.total_weight if self.objective.reduction == "mean" else 1.0
            loss, factor = empirical_fisher_factors(self.objective, output_d, batch,
                                                    scale * weight)
            rows = factor.layout.from_rows(factor.factors)
            return loss, [lambda: rows[0].to(output.dtype)], 1.0
        with torch.no_grad():
            loss = self.objective.loss(output_d, batch)
        crit, targets = self.objective.criterion, self.objective.targets
        assert crit is not None and targets is not None  # refused at construction
        target = targets(batch)
        if self.fisher_type == "mc":
            factor = monte_carlo_fisher_factors(crit, output_d, target, scale,
                                                self.mc_samples, rng, self._mc_normaliser)
            rows = factor.layout.from_rows(factor.factors)
            if rows.dtype != output.dtype:
                rows = rows.to(output.dtype)
            return loss, [(lambda s=s: rows[s]) for s in range(self.mc_samples)], (
                1.0 / self.mc_samples)
        root = LossHessianSqrt(crit, output_d, target, scale)
        return loss, [(lambda c=c: root.column(c).to(output.dtype))
                      for c in range(root.width)], 1.0

    def _layer_input(self, layer: _Layer, args: tuple) -> torch.Tensor:
        """The layer's input as ``(N_l, ..., c)`` rows of the factor dtype (a linear
        layer's input as it is: reshaping it is left to the caller, which needs one
        reshape, not two). Called, and its result used, under ``no_grad``: a detach
        per layer and batch fewer."""
        if len(args) != 1:
            raise TypeError(f"layer '{layer.name}' is called with {len(args)} inputs, not 1")
        x = args[0]
        if x.dtype != self.factor_dtype:
            x = x.to(self.factor_dtype)
        module = layer.module
        if x.ndim < (4 if isinstance(module, nn.Conv2d) else 2):
            raise ValueError(
                f"layer '{layer.name}' got an input of shape {tuple(x.shape)}; KFAC needs a "
                "leading batch dimension"
            )
        if isinstance(module, nn.Conv2d):
            x = _patches(x, module)
        if self._joint(layer):
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x

    def _layer_grad(self, layer: _Layer, g: torch.Tensor) -> torch.Tensor:
        # autograd.grad without create_graph gives tensors outside any graph: no detach
        if g.dtype != self.factor_dtype:
            g = g.to(self.factor_dtype)
        # (N_l, ..., d_out), channels last
        return g.movedim(1, -1) if isinstance(layer.module, nn.Conv2d) else g

    def _compute_factors(self) -> tuple[_Blocks, float]:
        """The factors, summed over the data straight into the stacks of the product
        (:class:`_Layout`): ``B`` for each layer, ``A`` beside a separate bias's 1.
        Returns the product's blocks and ``N``."""
        dtype, device, layout = self.factor_dtype, self.device, self._layout
        reduce = self.kfac_approx == "reduce"
        lefts = [torch.zeros(len(m), k[0], k[0], dtype=dtype, device=device)
                 for m, k in zip(layout.members, layout.keys)]
        rights = [torch.zeros(len(m), layout.width(g), layout.width(g), dtype=dtype,
                              device=device) if layout.has_input_factor(g) else None
                  for g, m in enumerate(layout.members)]
        # per layer the views its batches add to
        A: dict[str, torch.Tensor] = {}
        B: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            g, pos = layout.place[layer.name]
            B[layer.name] = lefts[g][pos]
            right = rights[g]
            if layer.weight is not None and right is not None:
                a, b = layout.weight_columns(layer.name)
                A[layer.name] = right[pos] if b - a == right.shape[1] else right[pos, a:b, a:b]

        def on_inputs(layer: _Layer, x: torch.Tensor) -> None:
            if layer.weight is None:
                return
            if reduce:
                rows, share = (x if x.ndim == 2 else _per_example(x).mean(dim=1)), 1
            else:
                rows, share = _rows(x), math.prod(x.shape[1:-1])
            A[layer.name].addmm_(rows.mT, rows, alpha=1 / share)

        def on_grads(layer: _Layer, x, g: torch.Tensor, weight: float) -> None:
            rows = (g if g.ndim == 2 else _per_example(g).sum(dim=1)) if reduce else _rows(g)
            B[layer.name].addmm_(rows.mT, rows, alpha=weight)

        def local() -> tuple[BatchLosses, list[torch.Tensor]]:
            losses, examples = self._walk(on_inputs, on_grads)
            # the count is summed over the ranks with the factors, in their dtype; alone,
            # it is rounded to that dtype on the host (no transfer to the device and back)
            count = torch.tensor([examples], dtype=dtype,
                                 device=device if self.distributed else "cpu")
            return losses, [*lefts, *(r for r in rights if r is not None), count]

        parts = self._summed_over_ranks(local, "the construction of the Kronecker factors")
        examples = float(parts[-1])
        if examples <= 0:
            raise ValueError("the data has no examples: KFAC's input covariances are empty")
        summed = iter(parts[len(lefts):-1])
        groups = []
        for g, left in enumerate(parts[:len(lefts)]):
            right = next(summed) if rights[g] is not None else None
            if right is not None:
                # by the count tensor itself (a Python float would be wrapped and cast),
                # as a 0-dim tensor: on the host it then enters a CUDA kernel as a scalar
                right.div_(parts[-1][0])
                layout.pad_input_side(g, right)
            groups.append(_Group(left, right, None))
        return _Blocks(layout, groups), examples

    def _summed_over_ranks(self, local, what: str) -> list[torch.Tensor]:
        """``local()``'s tensors, summed over the ranks with one all-reduce; a NaN/inf
        loss anywhere raises on every rank."""
        with self._stage(self.device):
            losses, parts = local()
            # alone, the check below reads the losses itself: one host sync, not two
            bad = losses.nonfinite_batches() if self.distributed else []
        if not self.distributed:
            losses.raise_if_not_finite()
            return parts
        reached = checkpoint(self.device, self.process_group, nonfinite=len(bad), what=what)
        if reached.nonfinite:
            losses.raise_if_not_finite()
            raise NonFiniteLossError(
                f"the loss is not finite on {reached.nonfinite} batch(es) of other ranks"
            )
        flat = torch.cat([p.reshape(-1) for p in parts])
        flat = all_reduce_sum(flat, self.process_group, checkpointed=True)
        return [c.view(p.shape) for c, p in zip(flat.split([p.numel() for p in parts]), parts)]

    # -- products ----------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return _in_factor_dtype(self, self._blocks(), V)

    def _blocks(self) -> _Blocks:
        return self._factor_blocks

    def _factor_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Per block ``B`` and ``A`` (``None`` for a bias alone): views of the product's
        stacks, formed on first use (products need none of them)."""
        if self._factor_views is None:
            self._factor_views = self._factor_blocks.slot_views()
        return self._factor_views

    @property
    def factors(self) -> list[KroneckerFactor]:
        """The Kronecker blocks, in parameter order (a weight and its separate bias
        share one ``B`` tensor)."""
        return [KroneckerFactor(s.layer, tuple(self.param_names[i] for i in s.indices), A, B)
                for s, B, A in zip(self._slots, *self._factor_lists())]

    # -- closed forms from the factors -------------------------------------------------
    def _eigendecompositions(self) -> list[_Eigh]:
        """Per block ``(λ_B, Q_B, λ_A, Q_A)`` (``λ_A, Q_A`` ``None`` for a bias alone),
        computed once."""
        if self._eig is None:
            done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # a layer's shared B

            def eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                if id(M) not in done:
                    values, vectors = torch.linalg.eigh(M)
                    done[id(M)] = (values, vectors)
                return done[id(M)]

            self._eig = [(*eigh(B), *(eigh(A) if A is not None else (None, None)))
                         for B, A in zip(*self._factor_lists())]
        return self._eig

    def _block_eigenvalues(self) -> list[torch.Tensor]:
        """Per block, the ``(d_out, c)`` eigenvalues in the eigenbasis ``Q_B ⊗ Q_A``."""
        return [torch.outer(lb, la) if la is not None else lb[:, None]
                for lb, _, la, _ in self._eigendecompositions()]

    def eigenvalues(self) -> torch.Tensor:
        """All ``n`` eigenvalues, ascending, float64 on the CPU (``torch.linalg.eigvalsh``'s
        order), from the factors' eigendecompositions: ``λ_B,i λ_A,j`` per block for KFAC,
        the corrected ones for EKFAC. Cost: one ``eigh`` per factor (cached)."""
        values = torch.cat([e.reshape(-1) for e in self._block_eigenvalues()])
        return values.double().cpu().sort().values

    def eigenpairs(self, k: int, which: Literal["LA", "SA"] = "LA") -> KroneckerEigenpairs:
        """The ``k`` largest (``"LA"``) or smallest (``"SA"``) eigenpairs, exact from the
        factors: the eigenvector of ``λ_B,i λ_A,j`` is ``q_B,i ⊗ q_A,j`` in its block,
        zero elsewhere. Ties are broken arbitrarily. Memory: the ``(n, k)`` vectors."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
            raise ValueError(f"k must be an int with 1 <= k <= n={self.n}, got {k!r}")
        check_choice(which, ("LA", "SA"), "which")
        blocks = self._block_eigenvalues()
        flat = torch.cat([e.reshape(-1) for e in blocks]).double().cpu()
        order = flat.argsort(descending=which == "LA")[:k].flip(0) if which == "LA" else (
            flat.argsort()[:k])
        sizes = [e.numel() for e in blocks]
        starts = torch.tensor([0, *sizes]).cumsum(0)
        eig = self._eigendecompositions()
        parts = [torch.zeros(k, *p.shape, dtype=self.factor_dtype, device=self.device)
                 for p in self.params]
        for col, pos in enumerate(order.tolist()):
            j = int(torch.searchsorted(starts, pos, right=True)) - 1
            r, c = divmod(pos - int(starts[j]), blocks[j].shape[1])
            _, qb, _, qa = eig[j]
            vec = torch.outer(qb[:, r], qa[:, c] if qa is not None else qb.new_ones(1))
            slot = self._slots[j]
            for idx, piece in zip(slot.indices, vec.split(list(slot.widths), dim=1)):
                parts[idx][col] = piece.reshape(self.params[idx].shape)
        vectors = self._join_block(parts).to(self.dtype)
        return KroneckerEigenpairs(flat[order], vectors)

    def trace(self) -> float:
        """``tr = sum over blocks of tr(A) tr(B)`` (``tr(A) = 1`` for a bias alone)."""
        return float(sum(float(B.trace()) * (float(A.trace()) if A is not None else 1.0)
                         for B, A in zip(*self._factor_lists())))

    def logdet(self, damping: float = 0.0) -> float:
        """``log det(K + damping I)``, exact from the eigenvalues (Laplace's marginal
        likelihood: ``damping`` the prior precision over the data's scale).

        Raises:
            ValueError: ``K + damping I`` is not positive definite (the log-determinant
                of a singular or indefinite matrix is not a real number).
        """
        values = self.eigenvalues() + check_damping(damping)
        if not bool((values > 0).all()):
            raise ValueError(
                f"{type(self).__name__} + {damping:g} I is not positive definite (smallest "
                f"eigenvalue {float(values.min()):.3g}): its log-determinant is undefined; "
                "add damping"
            )
        return float(values.log().sum())

    def det(self, damping: float = 0.0) -> float:
        """``det(K + damping I)``, the product of the eigenvalues (``inf`` or ``0`` once it
        leaves float64's range: prefer :meth:`logdet`)."""
        return float((self.eigenvalues() + check_damping(damping)).prod())

    def inverse(self, damping: float | tuple[float, float] = 0.0, *,
                mode: DampingMode = "factors", min_damping: float = 1e-8,
                ) -> KFACInverseOperator:
        """The exact inverse of damped KFAC, as an operator (curvlinops'
        ``KFACInverseLinearOperator`` conventions):

        - ``mode="factors"`` (default): ``(B + δ_B I)⁻¹ ⊗ (A + δ_A I)⁻¹`` per block, with
          ``(δ_A, δ_B) = damping`` (a float damps both); a bias alone gets
          ``(B + δ_B I)⁻¹``. This is *not* ``(K + δ I)⁻¹``: damping the factors adds
          ``δ_B A ⊗ I + δ_A I ⊗ B + δ_A δ_B I``.
        - ``mode="heuristic"``: the factors damped by Martens & Grosse's (2015, §6.3)
          ``π = sqrt((tr A / dim A) / (tr B / dim B))``: ``δ_A = max(π sqrt(δ),
          min_damping)``, ``δ_B = max(sqrt(δ) / π, min_damping)``; a bias alone gets
          ``δ``.
        - ``mode="exact"``: ``(K + δ I)⁻¹`` itself, through the factors'
          eigendecompositions: ``Q ((λ_B λ_Aᵀ + δ)⁻¹) Qᵀ``.

        Cost: one ``eigh`` per factor (cached with the operator); each product is two
        batched matmuls per group of equal-shaped layers (``"factors"``, ``"heuristic"``)
        or four (``"exact"``).

        Raises:
            ValueError: a damped factor (or ``K + δ I``) is singular to working
                precision: its inverse does not exist; add damping.
        """
        check_choice(mode, DAMPING_MODES, "damping mode")
        if isinstance(damping, tuple):
            if mode != "factors" or len(damping) != 2:
                raise ValueError(
                    "damping as a pair (δ_A, δ_B) is for mode='factors'; the heuristic and "
                    f"exact modes take one number, got {damping!r}"
                )
            damp_a, damp_b = (check_damping(d) for d in damping)
        else:
            damp_a = damp_b = check_damping(damping)
            if mode == "heuristic" and damp_a < 0:
                raise ValueError(f"the heuristic damping takes sqrt(damping): damping must "
                                 f"be >= 0, got {damping!r}")
        eig = self._eigendecompositions()
        if mode == "exact":
            scale = [_inverted(e, damp_a, f"K + {damp_a:g} I in block {self._name(j)}")
                     for j, e in enumerate(self._block_eigenvalues())]
            blocks = _Blocks.of(self._layout, [e[1] for e in eig], [e[3] for e in eig], scale)
            return KFACInverseOperator(self, blocks, f"(K + {damp_a:g} I)^-1")
        # a layer's damping pair, also for its bias when that is a block of its own
        # (curvlinops damps the layer's one B for both)
        pairs: dict[str, tuple[float, float]] = {}
        for slot, (lb, _, la, _) in zip(self._slots, eig):
            pairs.setdefault(slot.layer, (damp_a, damp_b))
            if mode == "heuristic" and la is not None:
                mean_a, mean_b = float(la.sum()) / la.numel(), float(lb.sum()) / lb.numel()
                if mean_a >= 0 and mean_b > 0:
                    pi = math.sqrt(mean_a / mean_b)
                    pairs[slot.layer] = (max(pi * math.sqrt(damp_a), min_damping),
                                         max(math.sqrt(damp_a) / pi, min_damping))
        left: list[torch.Tensor] = []
        right: list[torch.Tensor | None] = []
        for j, (lb, qb, la, qa) in enumerate(eig):
            da, db = pairs[self._slots[j].layer]
            name = self._name(j)
            left.append((qb * _inverted(lb, db, f"B + {db:g} I of block {name}")) @ qb.T)
            if la is None or qa is None:
                right.append(None)
            else:
                right.append((qa * _inverted(la, da, f"A + {da:g} I of block {name}")) @ qa.T)
        what = "heuristically damped" if mode == "heuristic" else f"damping {damping}"
        return KFACInverseOperator(self, _Blocks.of(self._layout, left, right),
                                   f"KFAC^-1 ({what})")

    def _name(self, j: int) -> str:
        return "/".join(self.param_names[i] for i in self._slots[j].indices)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} n={self.n} fisher_type={self.fisher_type!r} "
                f"kfac_approx={self.kfac_approx!r} blocks={len(self._slots)} "
                f"dtype={self.dtype} device={self.device}>")


class EKFACOperator(KFACOperator):
    """EKFAC (George et al. 2018): KFAC's eigenbasis with corrected eigenvalues.

    Per block, with ``Q_B ⊗ Q_A`` the eigenvectors of KFAC's factors, the eigenvalues are
    ``E_ij = sum_n (Q_Bᵀ G_n Q_A)_ij²`` (times ``1/mc_samples``), ``G_n`` the gradient of
    example ``n`` with respect to the block's weight (``d_out x c``; its shared positions
    summed) for the same backpropagated vectors as KFAC's ``B``. The operator is
    ``Q diag(E) Qᵀ`` per block. Arguments as for :class:`KFACOperator`; construction
    walks the data a second time (and, distributed, all-reduces ``E`` once more).
    Per batch, the rotated per-example gradients take ``N_b d_out c`` memory per layer.

    ``factors`` are still KFAC's; :meth:`eigenvalues`, :meth:`trace`, :meth:`logdet`
    use ``E``; :meth:`inverse` is exact: ``Q ((E + δ)⁻¹) Qᵀ``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._corrected = self._compute_corrections()
        self._eigenbasis_blocks: _Blocks | None = None

    def _compute_corrections(self) -> list[torch.Tensor]:
        eig = self._eigendecompositions()
        slots_of: dict[str, list[int]] = {}
        for j, s in enumerate(self._slots):
            slots_of.setdefault(s.layer, []).append(j)
        E = [torch.zeros(s_eig[0].shape[0], sum(s.widths), dtype=self.factor_dtype,
                         device=self.device) for s, s_eig in zip(self._slots, eig)]

        def on_inputs(layer: _Layer, x: torch.Tensor) -> dict[int, torch.Tensor]:
            # the inputs in the eigenbasis, once per batch for all its backpropagated
            # vectors (x has the 1 appended exactly when the block is joint)
            x = _per_example(x)
            return {j: x @ q for j in slots_of[layer.name] if (q := eig[j][3]) is not None}

        def on_grads(layer: _Layer, xq, g: torch.Tensor, weight: float) -> None:
            rotated: dict[int, torch.Tensor] = {}  # a weight and its bias share Q_B
            for j in slots_of[layer.name]:
                _, qb, _, qa = eig[j]
                if id(qb) not in rotated:
                    rotated[id(qb)] = _per_example(g) @ qb  # (N, S, d_out)
                gq = rotated[id(qb)]
                if qa is None:
                    E[j].add_((gq.sum(dim=1) ** 2).sum(dim=0)[:, None], alpha=weight)
                else:
                    E[j].add_(_squared_per_example_gradients(gq, xq[j]), alpha=weight)

        def local():
            losses, _ = self._walk(on_inputs, on_grads, keep_inputs=True)
            return losses, E

        return self._summed_over_ranks(local, "the construction of EKFAC's eigenvalues")

    def _blocks(self) -> _Blocks:
        if self._eigenbasis_blocks is None:  # formed once: stacked, bias blocks as matmuls
            eig = self._eigendecompositions()
            self._eigenbasis_blocks = _Blocks.of(
                self._layout, [e[1] for e in eig], [e[3] for e in eig], self._corrected)
        return self._eigenbasis_blocks

    def _block_eigenvalues(self) -> list[torch.Tensor]:
        return self._corrected

    def trace(self) -> float:
        """``tr = sum E``, the corrected eigenvalues' sum."""
        return float(sum(float(e.sum()) for e in self._corrected))

    def inverse(self, damping: float | tuple[float, float] = 0.0, *,
                mode: DampingMode = "exact", min_damping: float = 1e-8,
                ) -> KFACInverseOperator:
        """``(EKFAC + δ I)⁻¹ = Q ((E + δ)⁻¹) Qᵀ`` per block, exact (EKFAC's eigenvalues
        are not a Kronecker product, so there are no factors to damp: only
        ``mode="exact"``; ``min_damping`` is only part of KFAC's signature).

        Raises:
            ValueError: ``E + δ`` has a zero (or negative) entry; add damping.
        """
        if mode != "exact" or isinstance(damping, tuple):
            raise ValueError(
                "EKFAC's inverse is exact only (mode='exact' with one damping value): its "
                "eigenvalues are not a Kronecker product of two factors' eigenvalues"
            )
        delta = check_damping(damping)
        eig = self._eigendecompositions()
        scale = [_inverted(e, delta, f"EKFAC + {delta:g} I in block {self._name(j)}")
                 for j, e in enumerate(self._corrected)]
        blocks = _Blocks.of(self._layout, [e[1] for e in eig], [e[3] for e in eig], scale)
        return KFACInverseOperator(self, blocks, f"(EKFAC + {delta:g} I)^-1")


class KFACInverseOperator(ParameterOperator):
    """The inverse of a damped :class:`KFACOperator` / :class:`EKFACOperator`, from
    :meth:`KFACOperator.inverse`; block-diagonal like its operator, exact (no iterative
    solve), symmetric, positive definite. Usable wherever an operator is, e.g. as the
    ``preconditioner`` of :func:`torchcurv.solve`.

    Attributes:
        operator: the (E)KFAC operator it inverts.
        description: which damped matrix it inverts.
    """

    def __init__(self, operator: KFACOperator, blocks: _Blocks, description: str) -> None:
        super().__init__(operator.params)
        self.operator = operator
        self.description = description
        self._blocks = blocks

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return _in_factor_dtype(self, self._blocks, V)

    def __repr__(self) -> str:
        return f"<KFACInverseOperator {self.description} n={self.n} dtype={self.dtype}>"


# -- helpers -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Edge:
    """Where a layer output's gradient arrives in the graph, and the output's shape."""

    edge: GradientEdge
    shape: torch.Size


_STOCK_FORWARDS = tuple(layer.forward for layer in SUPPORTED_LAYERS)


def _output_edge(output: torch.Tensor, stock: bool) -> _Edge | None:
    """The gradient edge of ``output`` as of now, when it has one that an in-place
    operation downstream (an in-place activation) leaves in the graph; else ``None``,
    and the caller backpropagates to a copy of it instead.

    An in-place operation on a tensor moves the tensor's ``grad_fn`` on, but the node
    the edge names still receives the gradient of the value before it, the layer
    output's. On a view it rebuilds the view's ``grad_fn`` from its base instead, so
    the view's node leaves the graph: for a view that is its whole base in the same
    order (``nn.Linear`` on more than two dimensions folds them into one matmul and
    views the result back) the base's edge serves, its gradient the output's reshaped,
    when the layer's ``forward`` is torch's own (``stock``), which uses the base for
    nothing else; other views, and outputs outside any graph, get none.
    """
    if not output.requires_grad:
        return None
    if output._base is None:
        return _Edge(get_gradient_edge(output), output.shape)
    base = output._base
    whole = (base.numel() == output.numel() and base.storage_offset() == output.storage_offset()
             and base.is_contiguous() and output.is_contiguous())
    if stock and whole and base.requires_grad and base.grad_fn is not None:
        return _Edge(get_gradient_edge(base), output.shape)
    return None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, ..., c)`` as ``(R, c)`` rows (no operation for ``(N, c)``)."""
    return x if x.ndim == 2 else x.reshape(-1, x.shape[-1])


def _per_example(x: torch.Tensor) -> torch.Tensor:
    """``(N, ..., c)`` as ``(N, S, c)``: its middle axes as one shared axis."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _squared_per_example_gradients(gq: torch.Tensor, xq: torch.Tensor,
                                   budget: int = 2**26) -> torch.Tensor:
    """``sum_n (G_n)²`` with ``G_n = gq_nᵀ xq_n`` (``gq`` ``(N, S, d)``, ``xq``
    ``(N, S, c)``), never holding more than about ``budget`` entries.

    Two ways (curvlinops chooses alike): with little weight sharing, the Gramian form
    ``sum_n sum_ss' (gq_ns ⊙ gq_ns') (xq_ns ⊙ xq_ns')ᵀ``, one matmul over ``N S²`` rows
    (for ``S = 1`` simply ``(gq²)ᵀ (xq²)``); otherwise the per-example gradients
    themselves, ``N d c`` entries, a chunk of examples at a time.
    """
    n, s, d = gq.shape
    c = xq.shape[-1]
    if s * s * (d + c) <= d * c:
        P = (gq[:, :, None, :] * gq[:, None, :, :]).reshape(-1, d)
        Q = (xq[:, :, None, :] * xq[:, None, :, :]).reshape(-1, c)
        return P.T @ Q
    out = gq.new_zeros(d, c)
    step = max(1, budget // (d * c))
    for start in range(0, n, step):
        per_example = torch.einsum("nsd,nsc->ndc", gq[start:start + step], xq[start:start + step])
        out += (per_example ** 2).sum(dim=0)
    return out


def _num_examples(batch: Batch, output: torch.Tensor) -> float:
    """``N_b``: the rows of ``X`` for ``(X, y)`` batches (curvlinops' ``num_data``),
    else the leading dimension of the model output."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0],
                                                                             torch.Tensor):
        return float(batch[0].shape[0])
    if output.ndim == 0:
        raise ValueError("the model output has no batch dimension: KFAC needs one")
    return float(output.shape[0])


def _check_conv(name: str, module: nn.Conv2d) -> None:
    if module.padding_mode != "zeros":
        raise TypeError(
            f"layer '{name}' pads with padding_mode={module.padding_mode!r}; KFAC's patches "
            "are defined for zero padding only"
        )
    if isinstance(module.padding, str) and module.padding == "same":
        for k, d in zip(module.kernel_size, module.dilation):
            if (d * (k - 1)) % 2:
                raise TypeError(
                    f"layer '{name}' has padding='same' with unequal padding on the two "
                    "sides (even kernel); KFAC's patches need symmetric padding"
                )


def _patches(x: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
    """``(N, L, c_in/groups * k1 * k2)``: the patches of each output location, with the
    channel groups averaged (curvlinops' convention for grouped convolutions)."""
    if module.groups > 1:
        n, c, h, w = x.shape
        x = x.reshape(n, module.groups, c // module.groups, h, w).mean(dim=1)
    padding = module.padding
    if isinstance(padding, str):
        padding = (0, 0) if padding == "valid" else tuple(
            d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    cols = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation,
                                padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


def _inverted(values: torch.Tensor, damping: float, what: str) -> torch.Tensor:
    """``1 / (values + damping)``, refusing a damped matrix singular to working precision."""
    damped = values + damping
    eps = torch.finfo(values.dtype).eps
    # eigh's eigenvalues are accurate to about eps * ||A|| each: a damped value within a
    # few of those of zero carries no information (a rank-deficient factor plus damping
    # is fine)
    floor = 16 * eps * max(float(values.abs().max()), damping)
    smallest = float(damped.min())
    if not smallest > floor:
        raise ValueError(
            f"{what} is singular to working precision (smallest eigenvalue {smallest:.3g}"
            f" vs {floor:.3g}): its inverse does not exist; add damping"
        )
    return 1 / damped
