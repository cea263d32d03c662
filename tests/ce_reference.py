"""Float64 oracles and random inputs shared by the cross-entropy Hessian-product tests."""

from __future__ import annotations

import torch


def hessian_matrix_product(
    logits: torch.Tensor, U: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """``w_r (diag(p_r) - p_r p_r^T) u_r`` in float64 through the explicit (N, V, V) matrices.

    A different computation from the kernels' ``p*u - p<p,u>``: it builds each row's
    Hessian. Returns float64 of ``U``'s shape; keep V small.
    """
    p = torch.softmax(logits.double(), dim=-1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    U3 = U.double().reshape(-1, *logits.shape)
    out = torch.einsum("nvw,mnw->mnv", H, U3)
    if weights is not None:
        out = out * weights.double().unsqueeze(-1)
    return out.reshape(U.shape)


def random_case(
    n: int,
    v: int,
    m: int | None,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    seed: int,
    logit_scale: float = 3.0,
    logit_shift: float = 0.0,
    masked_rows: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh logits ``(n, v)``, directions ``(n, v)`` (m None) or ``(m, n, v)``, weights ``(n,)``.

    Weights are random positive except 0 on ``masked_rows``. Everything drawn in float64
    on the CPU and then cast, so a seed gives the same case on every device.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * logit_scale + logit_shift
    u_shape = (n, v) if m is None else (m, n, v)
    U = torch.randn(*u_shape, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    weights[list(masked_rows)] = 0.0
    cast = dict(dtype=dtype, device=device)
    return logits.to(**cast), U.to(**cast), weights.to(torch.float32).to(device)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; the absolute error when
    ``expected`` is zero (V=1). NaN anywhere gives NaN."""
    a, e = actual.double().cpu(), expected.double().cpu()
    scale = e.norm()
    return float((a - e).norm() / (scale if scale > 0 else 1.0))


# Relative error allowed against the float64 oracle: one rounding of the output to U's
# dtype, the softmax and sums in float32 (float64 stays float64).
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
