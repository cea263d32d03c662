"""What every model-based curvature operator shares: parameters, data, weighting, safety.

Subclasses implement :meth:`CurvatureOperator._batch_matmat`, the product of one batch's
curvature (already scaled to its share of the data set's loss) with per-parameter blocks.
This class walks the data, sums the batch products, checks the loss for NaN/inf, and
gives the model back untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from torchcurv.data import check_reiterable, fingerprint, iterate
from torchcurv.errors import NondeterminismError, NonFiniteLossError
from torchcurv.objectives import Objective, as_objective
from torchcurv.operators.attention import differentiable_attention
from torchcurv.operators.base import ParameterOperator
from torchcurv.operators.microbatch import (
    check_microbatch_size,
    refuse_batch_coupling,
    split_batch,
)
from torchcurv.operators.model_guard import preserved
from torchcurv.operators.params import select_parameters

Batch = Any

_RANDOM_IN_TRAIN_MODE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                         nn.AlphaDropout, nn.FeatureAlphaDropout)


class CurvatureOperator(ParameterOperator):
    """Base of the operators built from ``(model, criterion, data)``.

    Args:
        model: the network; it is never modified (weights, buffers, ``.grad``, modes).
        criterion: a torch loss module (``nn.CrossEntropyLoss()``, ...) applied to batches
            ``(X, y)``, or an :class:`~torchcurv.Objective` for other batch layouts.
        data: a re-iterable of batches (list, ``DataLoader``); not empty.
        params: parameters to differentiate (default: all that require grad).
        param_filter: glob(s) on parameter names selecting a subset.
        check_deterministic: at construction, walk the data twice and evaluate the first
            batch's loss twice; raise :class:`~torchcurv.NondeterminismError` if they
            differ (shuffling loader, random augmentation, dropout). Also refuse models
            with active dropout.
        microbatch_size: split every batch into chunks of at most this many examples
            (dim 0 of every tensor in the batch, dict batches too), each weighted by its
            own loss-term count, to bound the memory of one product. The operator is the
            same matrix (up to rounding). Refused for models that mix the examples of a
            batch (BatchNorm in train mode) and for mean-reduced objectives without a
            ``weight``; with ``check_deterministic``, batch 0's loss is also checked to be
            the weighted mean of its microbatches' losses.

    Products run with SDPA restricted to its math backend
    (:func:`~torchcurv.operators.attention.differentiable_attention`), and for float16 /
    bfloat16 models the batch products are summed in float32 and rounded once at the end.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        params: Iterable[torch.Tensor] | None = None,
        param_filter: str | Sequence[str] | None = None,
        check_deterministic: bool = True,
        microbatch_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.objective = as_objective(criterion)
        self.param_names, self.params = select_parameters(model, params, param_filter)
        super().__init__(self.params)
        check_reiterable(data)
        self.data = data
        check_microbatch_size(microbatch_size)
        self.microbatch_size = microbatch_size
        self._check_model_mode(strict=check_deterministic)
        if microbatch_size is not None:
            self._check_splittable()
        self.total_weight = self._total_weight(check_deterministic)
        if microbatch_size is not None and check_deterministic:
            self._check_split_loss_matches()

    # -- construction-time checks --------------------------------------------------
    def _check_model_mode(self, strict: bool) -> None:
        for name, m in self.model.named_modules():
            if not m.training:
                continue
            if isinstance(m, _RANDOM_IN_TRAIN_MODE) and m.p > 0 and strict:
                raise NondeterminismError(
                    f"module '{name}' ({type(m).__name__}, p={m.p}) is in train mode, so the "
                    "operator would be random; call model.eval() first (or pass "
                    "check_deterministic=False to accept a random operator)"
                )
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                warnings.warn(
                    f"module '{name}' (BatchNorm) is in train mode: the operator is the "
                    "curvature of the train-mode loss with per-batch statistics and changes "
                    "with the batching; call model.eval() for the usual curvature",
                    stacklevel=3,
                )

    def _total_weight(self, check: bool) -> float:
        weights, prints = [], []
        for batch in iterate(self.data, self.device):
            weights.append(self.objective.batch_weight(batch))
            if check:
                prints.append(fingerprint(batch))
        if not weights:
            raise ValueError("data is empty: it yielded no batch")
        total = float(sum(float(w) for w in weights))
        if total <= 0:
            raise ValueError(
                f"the data set has {total} loss terms (all targets ignored?); nothing to "
                "differentiate"
            )
        if check:
            again = [fingerprint(b) for b in iterate(self.data, self.device)]
            if again != prints:
                raise NondeterminismError(
                    "the data gives different batches on two passes (shuffle=True, random "
                    "augmentation, or a sampler with state?); curvature products walk the data "
                    "once per product and need the same batches each time. Use shuffle=False "
                    "or pass check_deterministic=False"
                )
            self._check_loss_repeatable()
        return total

    def _check_loss_repeatable(self) -> None:
        batch = next(iter(iterate(self.data, self.device)))
        with preserved(self.model), torch.no_grad():
            first = self.objective(self.model, batch).detach().clone()
            second = self.objective(self.model, batch).detach()
        tol = 1e-6 * float(first.abs().clamp_min(1e-30))
        if not torch.isfinite(first):
            raise NonFiniteLossError(f"the loss on batch 0 is {float(first)}")
        if abs(float(first) - float(second)) > tol:
            raise NondeterminismError(
                f"the model's loss on the same batch differs between two evaluations "
                f"({float(first)!r} vs {float(second)!r}): a random layer in the model? "
                "call model.eval() or pass check_deterministic=False"
            )

    def _check_splittable(self) -> None:
        refuse_batch_coupling(self.model)
        if self.objective.reduction == "mean" and self.objective.weight is None:
            raise ValueError(
                "microbatch_size needs the objective's weight (loss terms per batch) to "
                "weigh the microbatches of a mean-reduced loss; pass "
                "Objective(..., weight=lambda batch: <number of loss terms>)"
            )

    def _check_split_loss_matches(self) -> None:
        """Catch batch coupling no module check sees (custom layers, in-batch losses)."""
        for batch in iterate(self.data, self.device):
            pieces = split_batch(batch, self.microbatch_size)
            weight = float(self.objective.batch_weight(batch))
            if len(pieces) > 1 and weight > 0:
                break
        else:
            return  # no batch with loss terms is larger than a microbatch: nothing to check
        with preserved(self.model), torch.no_grad():
            whole = float(self.objective(self.model, batch))
            split = 0.0
            for piece in pieces:
                share = float(self._piece_scale(piece, weight))
                if share != 0:
                    split += share * float(self.objective(self.model, piece))
        tol = torch.finfo(self.dtype).eps ** 0.5 * max(abs(whole), 1e-30)
        if not abs(whole - split) <= tol:
            raise ValueError(
                f"splitting a batch into microbatches of {self.microbatch_size} changes its "
                f"loss ({whole!r} whole vs {split!r} from the microbatches): the model or the "
                "loss couples the examples of a batch, so microbatching would change the "
                "curvature. Drop microbatch_size (or pass check_deterministic=False to skip "
                "this check)"
            )

    # -- products ------------------------------------------------------------------
    def _batch_matmat(
        self, batch: Batch, scale: torch.Tensor | float, blocks: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One batch's scaled curvature times ``blocks`` (per parameter ``(m, *shape)``).

        Returns the batch's (unscaled) loss, for the NaN check, and the products.
        """
        raise NotImplementedError

    def _perturbed_params(self) -> Sequence[torch.Tensor]:
        """Parameters a product perturbs in place (restored afterwards)."""
        return ()

    def _batches(self):
        """``(index, batch, scale)`` with ``scale = w_b / sum w`` (1 for 'sum').

        With ``microbatch_size``, one entry per microbatch (``index`` is its batch's);
        microbatches without loss terms are left out: their mean loss is 0/0, and their
        share of the data set's loss is zero.
        """
        for i, batch in enumerate(iterate(self.data, self.device)):
            if self.microbatch_size is None:
                yield i, batch, self._piece_scale(batch, self.total_weight)
                continue
            for piece in split_batch(batch, self.microbatch_size):
                scale = self._piece_scale(piece, self.total_weight)
                # one host sync per microbatch, small beside its forward and backwards
                if self.objective.reduction == "sum" or float(scale) != 0:
                    yield i, piece, scale

    def _piece_scale(self, piece: Batch, total: float) -> torch.Tensor | float:
        """``piece``'s share ``w / total`` of a mean-reduced loss (1 for 'sum')."""
        if self.objective.reduction == "sum":
            return 1.0
        w = self.objective.batch_weight(piece)
        # float64 so that int counts divided by the total lose nothing
        w = w.to(torch.float64) if isinstance(w, torch.Tensor) else float(w)
        return w / total

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        blocks = self._split_block(V)
        total = [torch.zeros_like(b, dtype=_accumulation_dtype(b.dtype)) for b in blocks]
        losses, batch_of = [], []
        with preserved(self.model, self._perturbed_params()), differentiable_attention():
            for i, batch, scale in self._batches():
                loss, out = self._batch_matmat(batch, scale, blocks)
                losses.append(loss.detach().reshape(()))
                batch_of.append(i)
                for t, o in zip(total, out):
                    t.add_(o)
        self._raise_if_not_finite(losses, batch_of)
        return self._join_block([t.to(self.dtype) for t in total])

    @staticmethod
    def _raise_if_not_finite(
        losses: list[torch.Tensor], batch_of: list[int] | None = None
    ) -> None:
        """``batch_of[j]``: the batch index of ``losses[j]`` (default ``j``; microbatches)."""
        # One host sync per product, not one per batch.
        finite = torch.isfinite(torch.stack(losses).float())
        if not bool(finite.all()):
            bad = [j for j, ok in enumerate(finite.tolist()) if not ok]
            batches = sorted({batch_of[j] for j in bad}) if batch_of is not None else bad
            raise NonFiniteLossError(
                f"the loss is not finite on batch(es) {batches[:10]} "
                f"(value {float(losses[bad[0]])}); the curvature there is undefined"
            )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sum 16-bit batch products in float32: bf16 keeps 8 bits, lost after ~100 batches."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
