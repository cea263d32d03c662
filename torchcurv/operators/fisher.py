"""The empirical Fisher and the Monte-Carlo Fisher of the data set's loss.

Conventions (curvlinops' ``EFLinearOperator`` / ``FisherMCLinearOperator``): write the
data set's loss ``L = c sum_r s_r`` with ``s_r`` the loss terms of sample ``r`` (a row of
``(N, C)`` logits, a token of ``(N, C, T)`` logits, the last axis of other outputs; see
:mod:`torchcurv.losses.layout`), ``c = 1 / (number of loss terms)`` for ``"mean"`` and
``1`` for ``"sum"``. Then ``EF = c sum_r ∇s_r ∇s_rᵀ``; e.g. for ``MSELoss`` a sample's
``s_r`` sums its ``K`` squared errors and ``c = 1 / (N K)``.

Differences from curvlinops 3.0.1: ``c`` counts loss terms as the criterion does, so
``ignore_index`` targets and class weights are exact (curvlinops divides by the row
count); the Monte-Carlo Fisher multiplies each sampled gradient by the square root of its
sample's loss-Hessian factor (zero for ignored targets, class and ``pos_weight``), so
its expectation is the GGN also then; BCE targets need not be binary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from torchcurv.losses.fisher import (
    SAMPLEABLE,
    empirical_fisher_factors,
    monte_carlo_fisher_factors,
)
from torchcurv.objectives import Objective
from torchcurv.operators.config import (
    CurvatureConfig,
    CurvatureOptions,
    MCFisherConfig,
    snapshot,
)
from torchcurv.operators.jacobian import JvpMethod
from torchcurv.operators.output_space import OutputSpaceOperator, ProductState

Batch = Any


class EmpiricalFisherOperator(OutputSpaceOperator):
    """``EF = c sum_r ∇s_r ∇s_rᵀ``: per-sample gradient outer products (see module doc).

    Computed as ``Jᵀ (g gᵀ) J`` per sample in output space, never materialising
    per-sample parameter gradients: the cost of a GGN product (see
    :class:`~torchcurv.GGNOperator`). Works with any criterion or
    :class:`~torchcurv.Objective` whose batch loss is a sum over samples.

    Arguments: as for :class:`~torchcurv.operators.output_space.OutputSpaceOperator`.

    Example:
        For a linear model ``f(x) = w·x`` under ``MSELoss`` over ``N`` examples, sample
        ``i``'s loss term ``s_i = (w·x_i - y_i)^2`` has gradient ``2 r_i x_i`` with
        ``r_i = w·x_i - y_i`` and ``c = 1/N``, so ``EF = 4/N sum_i r_i^2 x_i x_iᵀ``:

        >>> import torch, torchcurv
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> EF = torchcurv.EmpiricalFisherOperator(model, nn.MSELoss(), [(X, y)])
        >>> r = model(X).detach() - y
        >>> torch.allclose(EF.to_dense(), 4 / 8 * X.T @ (r**2 * X))
        True
    """

    def _output_curvature(self, output, batch, scale, generator=None):
        # scale = w_b / W for "mean", so the batch's loss-term count is scale * W
        weight = scale * self.total_weight if self.objective.reduction == "mean" else 1.0
        return empirical_fisher_factors(self.objective, output, batch, scale * weight)


class SeededDraws:
    """The random streams of the operators that draw labels from the model: the
    Monte-Carlo Fisher and KFAC's ``fisher_type="mc"``.

    Every pass over the data restarts from ``seed`` (or from the state ``generator`` had
    at construction), so the operator is a fixed matrix: one stream through all batches
    in order, or with ``per_batch_seeds`` a fresh generator per global batch index
    (seeded by SplitMix64 from the base seed and the index; no two batches anywhere
    share draws). Subclasses set ``self.seed`` and call :meth:`_init_draws` once their
    ``device`` and ``distributed`` are known.
    """

    seed: int
    device: torch.device
    distributed: bool

    def _init_draws(self, generator: torch.Generator | None,
                    per_batch_seeds: bool | None) -> None:
        self._state = None
        if generator is not None:
            if torch.device(generator.device).type != self.device.type:
                raise ValueError(
                    f"generator is on {generator.device}, the operator on {self.device}"
                )
            self._state = generator.get_state()
        self.per_batch_seeds = self.distributed if per_batch_seeds is None else bool(
            per_batch_seeds)
        self._base_seed = self.seed if self._state is None else int(
            torch.randint(2**62, (), generator=self.fresh_generator(), device=self.device))

    def fresh_generator(self) -> torch.Generator:
        """A generator in the state every pass over the data starts from."""
        rng = torch.Generator(device=self.device)
        if self._state is not None:
            rng.set_state(self._state)
        else:
            rng.manual_seed(self.seed)
        return rng

    def batch_generator(self, index: int) -> torch.Generator:
        """The generator global batch ``index`` draws from when ``per_batch_seeds``."""
        rng = torch.Generator(device=self.device)
        rng.manual_seed(_splitmix64(_splitmix64(self._base_seed) ^ index))
        return rng


class MCFisherOperator(SeededDraws, OutputSpaceOperator):
    """Monte-Carlo Fisher: ``c sum_r Jᵀ (1/S sum_k g_rk g_rkᵀ) J`` with ``g`` sampled.

    Labels are drawn per sample from the model's predictive distribution (categorical for
    ``CrossEntropyLoss``, Bernoulli for ``BCEWithLogitsLoss``, ``N(f, I/2)`` for
    ``MSELoss``) and ``g`` is the output gradient of the negative log-likelihood,
    weighted so that ``E[g gᵀ]`` is the sample's loss Hessian: the expectation is the
    GGN, and the error falls like ``1/sqrt(mc_samples)``.

    The operator is a fixed matrix: every product restarts the random stream from
    ``seed`` (or from the state ``generator`` had at construction), so all products, and
    all columns of a block, see the same labels.

    Two ways to draw (``per_batch_seeds``): one stream through all batches in order (the
    single-process default; curvlinops' ``FisherMCLinearOperator`` draws the same labels),
    or a fresh generator per batch, seeded from ``(seed, global batch index)``. The
    latter is the default on a distributed operator: rank ``r``'s batch ``i`` is global
    batch ``batch_offset + i`` (the shards in rank order), so the distributed operator
    equals the single-process one with ``per_batch_seeds=True`` on the concatenated
    shards, and no two batches anywhere share draws.

    Takes the arguments of :class:`~torchcurv.operators.output_space.OutputSpaceOperator`
    and those under Args below.

    Example:
        For a linear model ``f(x) = w·x`` under ``MSELoss`` over ``N`` examples the
        labels are ``N(f, 1/2)``, ``g_i = 2 (f(x_i) - ŷ_i) x_i`` and ``E[g_i g_iᵀ] =
        2 x_i x_iᵀ``: the expectation is the GGN ``2/N Xᵀ X``, met to about
        ``1/sqrt(N mc_samples)``:

        >>> import torch, torchcurv
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> F = torchcurv.MCFisherOperator(model, nn.MSELoss(), [(X, y)], mc_samples=4000)
        >>> expected = 2 / 8 * X.T @ X
        >>> bool((F.to_dense() - expected).norm() < 0.05 * expected.norm())
        True

    Args:
        mc_samples: labels drawn per sample and product.
        seed: seeds a ``torch.Generator`` on the operator's device.
        generator: alternatively, a generator on that device whose current state is used
            (the generator itself is never advanced).
        per_batch_seeds: draw each batch's labels from its own generator seeded from
            ``seed`` (or one number drawn from ``generator``'s state) and the global batch
            index; default ``True`` when distributed, else ``False``.
    """

    config_type = MCFisherConfig
    _graphable = False  # fresh label draws every product
    _exact_when_split = False  # labels are drawn per microbatch: a budget keeps columns

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        mc_samples: int = 1,
        seed: int = 0,
        generator: torch.Generator | None = None,
        per_batch_seeds: bool | None = None,
        jvp: JvpMethod = "forward",
        **options: Unpack[CurvatureOptions],
    ) -> None:
        self._build(MCFisherConfig.of(
            type(self).__name__, model, criterion, data, mc_samples=mc_samples, seed=seed,
            generator=snapshot(generator), per_batch_seeds=per_batch_seeds, jvp=jvp,
            **options))

    def _build(self, config: CurvatureConfig) -> None:
        assert isinstance(config, MCFisherConfig)
        mc_samples = config.mc_samples
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.seed = int(config.seed)
        super()._build(config)
        crit = self.objective.criterion
        if not isinstance(crit, SAMPLEABLE) or self.objective.targets is None:
            raise TypeError(
                f"the Monte-Carlo Fisher needs a criterion with a known predictive "
                f"distribution ({[c.__name__ for c in SAMPLEABLE]}), got "
                f"{type(crit).__name__ if crit is not None else 'an Objective without one'}"
            )
        self._init_draws(config.generator, config.per_batch_seeds)
        # Only for torchcurv.validation.dense, which draws a product's labels outside a
        # product by setting it and walking _batches; products never read or write it
        # (theirs travels in their ProductState).
        self._rng: torch.Generator | None = None

    def _new_product(self) -> ProductState:
        # Every product restarts the stream, in its own state: concurrent products of one
        # operator each draw the labels a lone product draws.
        product = super()._new_product()
        if not self.per_batch_seeds:
            product.generator = self.fresh_generator()
        return product

    def _enter_batch(self, product: ProductState, index: int) -> None:
        # microbatches of one batch continue its stream rather than restarting it
        if self.per_batch_seeds and index != product.batch:
            product.generator = self.batch_generator(self.batch_offset + index)
        super()._enter_batch(product, index)

    def _batches(self, checks=None):
        # The per-batch streams of a product, for a walk outside one (see self._rng).
        current = None
        for i, batch, scale in super()._batches(checks):
            if self._rng is not None and self.per_batch_seeds and i != current:
                self._rng = self.batch_generator(self.batch_offset + i)
                current = i
            yield i, batch, scale

    def _output_curvature(self, output, batch, scale, generator=None):
        if generator is None:
            generator = self._rng if self._rng is not None else self.fresh_generator()
        with torch.no_grad():
            loss = self.objective.loss(output, batch)
        factors = monte_carlo_fisher_factors(
            self.objective.criterion, output, self.objective.targets(batch), scale,
            self.mc_samples, generator,
        )
        return loss, factors


def _splitmix64(x: int) -> int:
    """SplitMix64's output function: nearby inputs give unrelated 63-bit seeds."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1
