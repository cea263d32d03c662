"""Which parameters a curvature operator acts on."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def select_parameters(
    model: nn.Module,
    params: Iterable[torch.Tensor] | None = None,
    param_filter: str | Sequence[str] | None = None,
) -> tuple[list[str], list[nn.Parameter]]:
    """Resolve the parameters an operator differentiates with respect to.

    Args:
        model: the module whose parameters are selected.
        params: explicit parameters; each must belong to ``model`` and require grad.
        param_filter: glob pattern(s) on parameter names (``fnmatch``, ``*`` also matches
            dots), e.g. ``"blocks.*.attn.*"``; applied to ``params`` if given, else to all
            parameters that require grad.

    Returns:
        ``(names, params)`` in the model's registration order.
    """
    named = list(model.named_parameters())
    name_of = {id(p): n for n, p in named}
    if params is not None:
        chosen = list(params)
        if not chosen:
            raise ValueError("params is empty: select at least one parameter")
        seen: set[int] = set()
        for i, p in enumerate(chosen):
            if id(p) not in name_of:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"parameter '{name_of[id(p)]}' does not require grad; curvature needs "
                    "requires_grad=True on every selected parameter"
                )
            if id(p) in seen:
                raise ValueError(f"parameter '{name_of[id(p)]}' is selected twice")
            seen.add(id(p))
        pool = [(n, p) for n, p in named if id(p) in seen]
    else:
        pool = [(n, p) for n, p in named if p.requires_grad]
        if not pool:
            raise ValueError("the model has no parameters that require grad")
    if param_filter is not None:
        patterns = [param_filter] if isinstance(param_filter, str) else list(param_filter)
        pool = [(n, p) for n, p in pool if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not pool:
            some = ", ".join(n for n, _ in named[:6])
            raise ValueError(
                f"param_filter {patterns} matches no parameter that requires grad "
                f"(names look like: {some}, ...)"
            )
    return [n for n, _ in pool], [p for _, p in pool]
