"""The Triton attention kernel (torchcurv.kernels.flash_attention) equals math SDPA.

Outputs, first derivatives, forward-mode JVPs and vmapped JVPs, causal and not, with
grouped KV heads, against SDPA's math backend in float64; the JVP of the backward
(forward over reverse) with causal, boolean and additive masks, vmapped; and the exact
Hessian product of a small attention model, which ``method="forward_over_reverse"``
routes to the kernel (counted) and ``method="autograd"`` keeps on math SDPA, against the
dense float64 Hessian; a learnable additive mask keeps math SDPA (Hessian and GGN). On
the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which must be
set before triton is imported, hence a subprocess, one for all checks since each pays
the imports) at small shapes; on a GPU they run compiled (``gpu``).
"""

import json
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
    B, H, Hk, T, D = 1, 2, 1, int(sys.argv[4]), 16
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


SECOND_ORDER = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from torch.func import grad, jvp, vmap
    from torchcurv.kernels import flash_attention as fa
    device, dt, tol = sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(0)
    H, Hk, T, D = 2, 1, int(sys.argv[4]), 8
    worst = 0.0
    def diff(a, b):
        global worst
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    def math_attention(q, k, v, attn_mask=None, is_causal=False):
        # (O, lse) of SDPA's math backend; lse is the log-sum-exp of the masked scores
        s = q @ k.repeat_interleave(H // Hk, 1).transpose(-1, -2) * D ** -0.5
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril() if is_causal else attn_mask
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return o, torch.logsumexp(s, -1)
    def kernel_attention(q, k, v, attn_mask=None, is_causal=False):
        mask = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.ndim)
                                                                + attn_mask.shape)
        return fa._Attention.apply(q, k, v, mask, is_causal, D ** -0.5)
    def gradient(attention, W, w, **kw):
        # grad_o = W + 2 O and grad_lse = w: the cotangents have tangents of their own
        def f(q, k, v):
            o, lse = attention(q, k, v, **kw)
            return (o * W).sum() + (o ** 2).sum() + (lse * w).sum()
        return grad(f, argnums=(0, 1, 2))
    bool_mask = torch.rand(2, 1, T, T, device=device) > 0.4
    bool_mask[1, 0, 3] = False  # a row that sees no key: zero output, zero derivatives
    # (batch, vectors in the vmapped block, mask): a batched mask with one vector, so that
    # each case launches 2 (batch x vector) programs per tile
    cases = [(1, 2, dict(is_causal=True)), (2, 1, dict(attn_mask=bool_mask)),
             (1, 2, dict(attn_mask=torch.randn(T, T, dtype=dt, device=device)))]
    for B, n, kw in cases:
        P = tuple(torch.randn(B, h, T, D, dtype=dt, device=device) for h in (H, Hk, Hk))
        W = torch.randn(B, H, T, D, dtype=dt, device=device)
        w = torch.randn(B, H, T, dtype=dt, device=device)
        tangents = [torch.randn(n, *x.shape, dtype=dt, device=device) for x in P]
        got, want = (vmap(lambda *t: jvp(gradient(attention, W, w, **kw), P, t))(*tangents)
                     for attention in (kernel_attention, math_attention))
        for a, b in zip(got, want):  # the gradients, then their tangents (H v)
            for x, y in zip(a, b):
                diff(x, y)
    print("jvp of the backward: worst relative error", worst)
    assert worst < tol, worst
""")

HESSIAN_ROUTED = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from torch import nn
    import torchcurv
    from torchcurv.kernels import flash_attention_triton as kernels
    from torchcurv.operators.attention import differentiable_attention
    from zoo import explicit_hessian, rel
    device, dt, tol = sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3])
    T = int(sys.argv[4]) // 2  # one tile in the interpreter: the kernels' tiling is above
    class Attention(nn.Module):
        def __init__(self, d=8, heads=2, kv_heads=1):
            super().__init__()
            self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
            self.qkv = nn.Linear(d, d + 2 * kv_heads * self.hd)
            self.out = nn.Linear(d, 3)
        def forward(self, x):
            b, t, d = x.shape
            kv = self.kv_heads * self.hd
            q, k, v = self.qkv(x).split([d, kv, kv], -1)
            q = q.view(b, t, self.heads, self.hd).transpose(1, 2)
            k, v = (y.view(b, t, self.kv_heads, self.hd).transpose(1, 2) for y in (k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.out(torch.tanh(o.transpose(1, 2).reshape(b, t, d)).mean(1))
    calls = {}
    for name in ("attention_forward", "attention_jvp", "attention_backward",
                 "attention_backward_jvp"):
        def counted(*a, _f=getattr(kernels, name), _n=name, **kw):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **kw)
        setattr(kernels, name, counted)
    g = torch.Generator().manual_seed(1)
    model = Attention().to(dt).to(device)
    data = [(torch.randn(b, T, 8, dtype=dt, generator=g).to(device),
             torch.randint(0, 3, (b,), generator=g).to(device)) for b in (2, 1)]
    criterion = nn.CrossEntropyLoss()
    with differentiable_attention("second"):  # the oracle: double backward, math SDPA
        exact = explicit_hessian(model, criterion, data)
    assert not calls, calls
    V = torch.randn(exact.shape[0], 2, dtype=dt, generator=g).to(device)
    for method in ("forward_over_reverse", "autograd"):
        calls.clear()
        # max_memory=None: one product for the block (no sub-blocks on CUDA)
        HV = torchcurv.HessianOperator(model, criterion, data, method=method,
                                       max_memory=None).matmat(V)
        print(method, rel(HV, exact @ V), calls)
        assert rel(HV, exact @ V) < tol, (method, rel(HV, exact @ V))
        # forward over reverse: every attention derivative on the kernel, one launch per
        # batch for the whole block; the double backward keeps math SDPA throughout
        expected = {} if method == "autograd" else dict.fromkeys(
            ("attention_forward", "attention_jvp", "attention_backward",
             "attention_backward_jvp"), len(data))
        assert calls == expected, (method, calls)
    # A learnable additive mask: the kernels compute neither its gradient nor its tangent,
    # so its SDPA calls stay on math SDPA, exactly, for the Hessian and the GGN alike.
    Tb = 8  # the mask is T x T parameters of the dense oracle
    class Biased(Attention):
        def __init__(self):
            super().__init__(kv_heads=2)
            self.bias = nn.Parameter(0.1 * torch.randn(Tb, Tb, dtype=dt, generator=g))
        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (y.view(b, t, 2, 4).transpose(1, 2) for y in self.qkv(x).split(d, -1))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
            return self.out(o.transpose(1, 2).reshape(b, t, d).mean(1))
    from curvature_oracles import explicit_ggn
    model = Biased().to(dt).to(device)
    data = [(x[:, :Tb], y) for x, y in data]
    with differentiable_attention("second"):
        exact = {"hessian": explicit_hessian(model, criterion, data),
                 "ggn": explicit_ggn(model, criterion, data)}
    V = torch.randn(exact["ggn"].shape[0], 2, dtype=dt, generator=g).to(device)
    for name, op in (("hessian", torchcurv.HessianOperator(model, criterion, data,
                                                           method="forward_over_reverse")),
                     ("ggn", torchcurv.GGNOperator(model, criterion, data, jvp="forward"))):
        calls.clear()
        assert rel(op.matmat(V), exact[name] @ V) < tol and not calls, (name, calls)
""")

DRIVER = textwrap.dedent("""
    import json, sys, time, traceback
    for name, source in json.loads(sys.stdin.read()):
        try:
            start = time.perf_counter()
            exec(source, {"__name__": name})
            print(name, "took", time.perf_counter() - start, "s")
            print("SECTION", json.dumps([name, None]), flush=True)
        except BaseException:
            print("SECTION", json.dumps([name, traceback.format_exc()]), flush=True)
""")

SECTIONS = {"first_order": CHECK, "jvp_of_backward": SECOND_ORDER,
            "hessian_routed": HESSIAN_ROUTED}


def _run(device: str, dtype: str, tol: float, T: int, interpret: bool) -> dict:
    """Runs every section in one subprocess; ``{section: None or its traceback}``."""
    env = dict(os.environ)
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), str(here),
                                         env.get("PYTHONPATH", "")])
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", DRIVER, device, dtype, str(tol), str(T)],
                         input=json.dumps(list(SECTIONS.items())), env=env,
                         capture_output=True, text=True, timeout=600)
    results = dict(json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines()
                   if line.startswith("SECTION "))
    assert out.returncode == 0 and set(results) == set(SECTIONS), out.stdout + out.stderr
    # Triton prints the compiler's diagnostics (the IR that failed to lower) on stderr
    tail = out.stderr[-4000:]
    return {k: v if v is None else f"{v}\n--- stderr (tail) ---\n{tail}"
            for k, v in results.items()}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return _run("cpu", "float64", 1e-12, 17, interpret=True)


def test_interpreted_kernels_equal_math_sdpa_in_float64(interpreted):
    assert interpreted["first_order"] is None, interpreted["first_order"]


def test_interpreted_jvp_of_the_backward_equals_math_sdpa_in_float64(interpreted):
    assert interpreted["jvp_of_backward"] is None, interpreted["jvp_of_backward"]


def test_forward_over_reverse_hessian_runs_on_the_kernel_and_is_exact(interpreted):
    assert interpreted["hessian_routed"] is None, interpreted["hessian_routed"]


@pytest.mark.gpu
def test_compiled_kernels_equal_math_sdpa_on_the_gpu():
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        failed = {k: v for k, v in _run("cuda", dtype, tol, 300, interpret=False).items() if v}
        if failed:  # pytest.fail prints the tracebacks whole (an assert's repr is cut)
            pytest.fail("\n\n".join(f"{dtype} {k}:\n{v}" for k, v in failed.items()))


def test_unsupported_calls_are_refused_with_a_reason():
    from torchcurv.kernels.flash_attention import unsupported_reason

    q = torch.randn(1, 2, 4, 8)
    if torch.cuda.is_available():
        assert "dropout" in unsupported_reason(q.cuda(), q.cuda(), q.cuda(), dropout_p=0.5)
    else:  # without the interpreter, CPU tensors are the first thing refused
        assert "CUDA" in unsupported_reason(q, q, q)


@pytest.mark.parametrize(("argument", "name", "compile", "order"), [
    ("method", "forward_over_reverse", False, "jvp"),
    ("method", "forward_over_reverse", True, "second"),
    ("method", "autograd", False, "second"),
    ("jvp", "forward", False, "jvp"),
    ("jvp", "forward", True, "second"),
    ("jvp", "double_vjp", False, "second"),
])
def test_only_uncompiled_forward_mode_products_may_use_the_kernel(argument, name, compile,
                                                                  order):
    """The block a product opens: "jvp" (kernel where it applies) for forward mode and
    forward over reverse, "second" (math SDPA) for double backward and for compiled
    products, which dynamo cannot trace through the kernel's autograd.Functions."""
    from torchcurv.derivatives import strategy_for
    from torchcurv.operators.attention import _thread_orders

    with strategy_for(argument, name, compile=compile).attention():
        assert _thread_orders() == [order]


@pytest.mark.parametrize("head_dim", [8, 16, 64, 80, 96, 128])
def test_the_scale_reaches_float64_kernels_to_float64_precision(head_dim):
    # Triton passes Python floats as float32: the kernels get the scale as two float32
    # parts. The interpreter (CPU tests) keeps Python floats, so only the GPU test above
    # would see a scale rounded to float32; this pins the parts themselves.
    from torchcurv.kernels.flash_attention_triton import _scale_parts

    scale = head_dim ** -0.5
    hi, lo = _scale_parts(scale)
    for part in (hi, lo):
        assert float(torch.tensor(part, dtype=torch.float32)) == part
    assert abs((hi + lo) - scale) <= 2.0 ** -46 * scale
