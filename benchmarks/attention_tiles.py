"""Which tile configurations of the Triton attention's kernels compile and agree on this
GPU, per dtype: a compiler that rejects a layout fails at the first launch (Triton
raises while lowering), so the defaults must be ones that compile for every dtype
the products use (float64 in the tests, float32, bfloat16).

    python benchmarks/attention_tiles.py          # CUDA

For each dtype and configuration, one launch of the backward and of the JVP of the
backward on random inputs (``B=1, H=2, Hkv=1, T=300, D=8``, causal: the GPU test's
shape); a row says whether it compiled, and the largest difference from the first
configuration that did (tiles change the summation order only). The default
configurations are marked.
"""
from __future__ import annotations

import argparse
import traceback

import torch
from common import emit, machine, write_to

from torchcurv.kernels import flash_attention_triton as fat

CONFIGS = [fat.TileConfig(m, n, w) for m, n, w in
           ((64, 64, 4), (32, 64, 8), (32, 64, 4), (32, 32, 4), (64, 32, 4), (16, 16, 4))]


def inputs(dtype: torch.dtype, T: int, D: int, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dt)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = r(1, 2, T, D), r(1, 1, T, D), r(1, 1, T, D)
    _o, lse = fat.attention_forward(q, k, v, None, True, D ** -0.5)
    return dict(q=q, k=k, v=v, lse=lse, do=r(1, 2, T, D), delta=r(1, 2, T, dt=acc),
                tq=r(1, 2, T, D), tk=r(1, 1, T, D), tv=r(1, 1, T, D),
                tlse=r(1, 2, T, dt=acc), tdo=r(1, 2, T, D), tdelta=r(1, 2, T, dt=acc))


def launch(kind: str, x: dict, config: fat.TileConfig) -> tuple[torch.Tensor, ...]:
    D = x["q"].shape[-1]
    if kind == "backward":
        return fat.attention_backward(x["q"], x["k"], x["v"], None, x["lse"], x["do"],
                                      x["delta"], True, D ** -0.5, config)
    return fat.attention_backward_jvp(
        x["q"], x["k"], x["v"], None, x["lse"], x["do"], x["delta"], x["tq"], x["tk"],
        x["tv"], x["tlse"], x["tdo"], x["tdelta"], True, D ** -0.5, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=300)
    ap.add_argument("--D", type=int, default=8)
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32", "bfloat16"],
                    choices=["float64", "float32", "bfloat16"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device("cuda")
    emit(what="machine", **machine(device))
    for dtype in (getattr(torch, d) for d in args.dtypes):
        x = inputs(dtype, args.T, args.D, device)
        size = torch.finfo(dtype).bits // 8
        defaults = {"backward": fat.default_config(args.D, size, backward=True),
                    "backward_jvp": fat.backward_jvp_config(args.D, size)}
        for kind in ("backward", "backward_jvp"):
            first = None
            for config in dict.fromkeys([defaults[kind], *CONFIGS]):
                row = dict(kernel=kind, dtype=str(dtype).removeprefix("torch."),
                           block_m=config.block_m, block_n=config.block_n,
                           num_warps=config.num_warps, default=config == defaults[kind])
                try:
                    out = launch(kind, x, config)
                    torch.cuda.synchronize()
                except Exception as e:
                    emit(**row, compiled=False, error=f"{type(e).__name__}: {e}"[:300],
                         where=traceback.format_exc().splitlines()[-3][:200])
                    continue
                if first is None:
                    first = out
                diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                           for a, b in zip(out, first))
                emit(**row, compiled=True, finite=all(bool(t.isfinite().all()) for t in out),
                     max_rel_diff_to_first=diff)


if __name__ == "__main__":
    main()
