"""The Triton attention kernel (torchcurv.kernels.flash_attention) equals math SDPA.

Outputs, first derivatives, forward-mode JVPs and vmapped JVPs, causal and not, with
grouped KV heads, against SDPA's math backend in float64. On the CPU the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before triton is
imported, hence a subprocess) at small shapes; on a GPU they run compiled (``gpu``).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from torchcurv.kernels.flash_attention import flash_attention
    device, dt, tol = sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(0)
    B, H, Hk, T, D = 2, 4, 2, int(sys.argv[4]), 16
    q, k, v = (torch.randn(B, h, T, D, dtype=dt, device=device, requires_grad=True)
               for h in (H, Hk, Hk))
    def ref(*x, **kw):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(*x, **kw)
    worst = 0.0
    def diff(a, b):
        global worst
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    P = (q.detach(), k.detach(), v.detach())
    for kw in (dict(enable_gqa=True), dict(enable_gqa=True, is_causal=True)):
        o, r = flash_attention(q, k, v, **kw), ref(q, k, v, **kw)
        diff(o, r)
        g = torch.randn_like(o)
        for a, b in zip(torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(r, (q, k, v), g)):
            diff(a, b)
        t = tuple(torch.randn_like(x) for x in P)
        diff(torch.func.jvp(lambda *x: flash_attention(*x, **kw), P, t)[1],
             torch.func.jvp(lambda *x: ref(*x, **kw), P, t)[1])
        T3 = [torch.randn(3, *x.shape, dtype=dt, device=device) for x in P]
        f = lambda fn: torch.func.vmap(
            lambda a, b, c: torch.func.jvp(lambda *x: fn(*x, **kw), P, (a, b, c))[1])(*T3)
        diff(f(flash_attention), f(ref))
    # a second differentiation is refused, not answered with a wrong zero
    gq, = torch.autograd.grad(flash_attention(q, k, v, enable_gqa=True).sum(), q,
                              create_graph=True)
    try:
        torch.autograd.grad(gq.sum(), q)
    except RuntimeError as e:
        assert "not implemented" in str(e), e
    else:
        raise AssertionError("double backward through the kernel did not raise")
    print("worst relative error", worst)
    assert worst < tol, worst
""")


def _run(device: str, dtype: str, tol: float, T: int, interpret: bool) -> None:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", CHECK, device, dtype, str(tol), str(T)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_interpreted_kernels_equal_math_sdpa_in_float64():
    _run("cpu", "float64", 1e-12, 19, interpret=True)


@pytest.mark.gpu
def test_compiled_kernels_equal_math_sdpa_on_the_gpu():
    _run("cuda", "float64", 1e-10, 300, interpret=False)
    _run("cuda", "float32", 1e-4, 300, interpret=False)


def test_unsupported_calls_are_refused_with_a_reason():
    from torchcurv.kernels.flash_attention import unsupported_reason

    q = torch.randn(1, 2, 4, 8)
    if torch.cuda.is_available():
        assert "dropout" in unsupported_reason(q.cuda(), q.cuda(), q.cuda(), dropout_p=0.5)
    else:  # without the interpreter, CPU tensors are the first thing refused
        assert "CUDA" in unsupported_reason(q, q, q)
