"""A billion parameters on one GPU: curvature products, top eigenvalues and a spectral
density of a LLaMA-style language model, with GPT-2 small beside hessian-eigenthings.

Issue 17, items 3 and 4, in one script whose every row carries ``nparams``.

Default mode (item 3), planned for one 10-minute call on an H200:

1. ``LLAMA["1.1b"]`` (TinyLlama's shape, 1.1B parameters), bfloat16, random weights built
   from the config on the GPU (no download), one batch of 2 x 2048 tokens, default SDPA
   attention. Each row has the dtype, tokens, seconds, ratio to one gradient, peak GiB
   (``torch.cuda.max_memory_allocated`` after a reset; everything resident counts) and
   ratio to one training step's peak: the gradient; a training step (AdamW); the floors
   measured in the same run (two gradients at ``theta +- h v``, the least a
   finite-difference HVP needs; a JVP plus a VJP with plain ``torch.func``, the least a
   GGN product needs); torchcurv's HVP with ``method="finite_difference"`` and
   ``"autograd"`` and its GGN with ``jvp="forward"`` and ``"finite_difference"``, each
   for one vector and for a block of ``k`` (the block the eigensolver's residual check
   multiplies at once); hessian-eigenthings' HVP (autograd and finite differences).
2. A ``plan`` row: for every solve the products it may take times the measured seconds
   per product, against ``--budget-s``; each solve's ``maxiter`` is cut to its share.
3. The top ``k = 10`` eigenvalues of the GGN and of the Hessian by
   ``torchcurv.eigsh(backend="lanczos")`` with their true residuals and ``converged``
   verdicts. Per matrix the exact product (GGN ``jvp="forward"``, Hessian
   ``method="autograd"``) is used when its measured block peak plus the Krylov basis fit
   in GPU memory, else the finite-difference one; a basis that fits beside no product
   goes to host memory.
4. An SLQ density of the Hessian (``torchcurv.spectral_density``), written as PNG with
   the top eigenvalues marked.
5. GPT-2 small (124M, ``GPT2Config()``, float32, 4 x 1024 tokens): the Hessian's top
   ``k`` by torchcurv beside hessian-eigenthings' Lanczos (``hessian_eigenthings.lanczos``,
   the same ``k``; version 1.0.0a5 has no ``compute_hessian_eigenthings``), first with the
   default SDPA attention, then eager; its eigenpairs get true residuals from
   torchcurv's exact operator.

``--largest`` (item 4): ``LLAMA["1.1b"]``, ``["3b"]``, ``["7b"]``, ``["13b"]`` in turn,
top ``k = 5`` Hessian eigenvalues with the Lanczos basis in host memory in bfloat16
(``basis_device="cpu", basis_dtype=torch.bfloat16``), the exact HVP where one product
fits, else finite differences; ``ncv`` as large as ``--host-gib`` allows (at most 10);
stops at the first size that fails and records why (also when the plan says the basis
cannot fit in host memory, without trying). Each size gets a share of ``--budget-s``
proportional to its parameter count.

Settings (stated in every solve row): bfloat16 solves use ``tol = 1e-2``: a bfloat16
product carries about 1e-2 relative rounding (docs/language-models.md, "Mixed
precision"), so no tighter residual can be certified; float32 (GPT-2) ``tol = 1e-3``.
``ncv = 21`` (ARPACK's ``2k + 1``) for ``k = 10``.

    python benchmarks/lm_billion.py --out benchmarks/results/lm_billion_h200.jsonl \\
        --figures benchmarks/results                       # GPU, item 3, ~10 min
    python benchmarks/lm_billion.py --largest --out benchmarks/results/lm_largest_h200.jsonl
    python benchmarks/lm_billion.py --quick                # tiny configs on the CPU, seconds
    python benchmarks/lm_billion.py --quick --largest
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from pathlib import Path

import torch
from common import emit, guarded, machine, peak_gib, sync, timed, write_to

import torchcurv
from torchcurv.algorithms.lanczos import _keep_count

LLAMA = {
    # TinyLlama-1.1B
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4),
    # Llama-3.2-3B's layers with the LLaMA-2 vocabulary: 3.0B
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8),
    # Llama-2-7B: 6.7B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    # Llama-2-13B: 13.0B
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40),
}
VOCAB = 32000
QUICK_LLAMA = {  # --quick: the same architecture, tiny, growing like the real sizes
    "1.1b": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "3b": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2),
    "7b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4),
    "13b": dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4),
}
QUICK_VOCAB = 128

FIT = 0.92
"""Share of the GPU (host) memory a plan may fill: the allocator's fragmentation and the
CUDA context need the rest."""
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-3, torch.float64: 1e-8}
FD_STEP = 1e-2
"""Step of the two-gradient floor, as large as bfloat16 needs (its relative rounding is
4e-3); the floor's time does not depend on it."""


# -- models and data --------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (no float32 copy of a 13B model first)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def llama(shape: dict, vocab: int, device: torch.device, dtype: torch.dtype, seq_len: int):
    """A random-weight ``LlamaForCausalLM`` of ``shape``, built on ``device`` in ``dtype``
    with SDPA attention (transformers' default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, vocab_size=vocab, max_position_embeddings=seq_len,
                      use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        return LlamaForCausalLM(cfg).eval()


def gpt2_small(device: torch.device, quick: bool, seq_len: int):
    """GPT-2 small (``GPT2Config()``, 124M) in float32; ``quick``: 2 layers of width 32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = (dict(n_layer=2, n_embd=32, n_head=4, vocab_size=500, n_positions=seq_len)
             if quick else {})
    cfg = GPT2Config(**shape, use_cache=False, attn_implementation="sdpa",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    with torch.device(device):
        return GPT2LMHeadModel(cfg).eval()


def token_batches(vocab: int, batch: int, seq_len: int, device: torch.device) -> list[dict]:
    """One batch of random token ids; ``labels`` too, so ``model(**batch).loss`` (the
    gradient rows, hessian-eigenthings) and ``causal_lm_objective`` see the same loss."""
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    return [{"input_ids": ids, "labels": ids}]


def nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- measuring ---------------------------------------------------------------------------

def free(device: torch.device) -> None:
    """Drop what a finished or failed row left (a traceback holds its frames' tensors)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def host_gib() -> dict:
    """This process' resident host memory now and its high-water mark (GiB)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return {"host_rss_gib": fields.get("VmRSS"), "host_peak_gib": fields.get("VmHWM")}


def ratio(a, b):
    return None if a is None or not b else a / b


class Rows:
    """Emits rows of one model with its context (``nparams``, dtype, tokens) and the
    baselines (one gradient's seconds, one training step's peak) that ratios refer to."""

    def __init__(self, model_name: str, model, batches, device, reps: int) -> None:
        self.device, self.reps = device, reps
        self.ctx = dict(model=model_name, nparams=nparams(model),
                        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                        tokens=sum(b["input_ids"].numel() for b in batches))
        self.grad_s: float | None = None
        self.train_peak: float | None = None

    def emit(self, **row) -> dict:
        row = {**self.ctx, **row}
        emit(**row)
        return row

    def guard(self, lib: str, what: str, fn) -> None:
        guarded(self.ctx["model"], lib, fn, what=what, **self.ctx)
        free(self.device)

    def product(self, lib: str, what: str, fn, reps: int | None = None) -> dict:
        """Time (median of ``reps`` after one warm-up) and peak of ``fn``."""
        s = timed(fn, self.device, reps=reps or self.reps, warmup=1)
        peak = peak_gib(self.device, fn)
        return self.emit(lib=lib, what=what, seconds=s, ratio_to_grad=ratio(s, self.grad_s),
                         peak_gib=peak, peak_ratio_to_train_step=ratio(peak, self.train_peak))

    def once(self, lib: str, what: str, fn, **extra) -> dict:
        """Seconds and peak of one call of ``fn`` (a block product, a solve)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        out = fn()
        sync(self.device)
        s = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.device.type == "cuda" else None)
        del out
        return self.emit(lib=lib, what=what, seconds=s, ratio_to_grad=ratio(s, self.grad_s),
                         peak_gib=peak, peak_ratio_to_train_step=ratio(peak, self.train_peak),
                         **extra)


def baselines(rows: Rows, model, batches) -> None:
    """The gradient and a training step (AdamW, ``lr = 0`` so the weights stay as they
    are and no copy of them is resident during the measurement)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient():
        for b in batches:
            torch.autograd.grad(model(**b).loss, params)

    rows.grad_s = timed(gradient, rows.device, reps=rows.reps, warmup=1)
    grad_peak = peak_gib(rows.device, gradient)
    opt = torch.optim.AdamW(params, lr=0.0)

    def step():
        for b in batches:
            model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows.train_peak = peak_gib(rows.device, step)
    step_s = timed(step, rows.device, reps=1, warmup=0)
    opt.state.clear()  # AdamW's two moments: not resident in the rows that follow
    free(rows.device)
    rows.emit(lib="torch", what="gradient", seconds=rows.grad_s, ratio_to_grad=1.0,
              peak_gib=grad_peak, peak_ratio_to_train_step=ratio(grad_peak, rows.train_peak))
    rows.emit(lib="torch", what="train_step(adamw)", seconds=step_s,
              ratio_to_grad=ratio(step_s, rows.grad_s), peak_gib=rows.train_peak,
              peak_ratio_to_train_step=1.0)


def floors(rows: Rows, model, batches) -> None:
    """The least a finite-difference HVP (two gradients at ``theta +- h v``) and a GGN
    product (a JVP and a VJP of the logits, plain ``torch.func``) can cost."""
    from torch.func import functional_call, jvp, vjp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]

    def two_gradients():
        origin = [p.detach().clone() for p in params]
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    torch._foreach_add_(params, v, alpha=sign * FD_STEP)
                for b in batches:
                    torch.autograd.grad(model(**b).loss, params)
                with torch.no_grad():
                    torch._foreach_copy_(params, origin)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, origin)

    rows.guard("torch", "floor/two_gradients",
               lambda: rows.product("torch", "floor/two_gradients", two_gradients))

    primals = {n: p.detach() for n, p in zip(names, params)}
    tangents = dict(zip(names, v))

    def logits(b):
        return lambda p: functional_call(model, p, (), {"input_ids": b["input_ids"]}).logits

    def jvp_vjp():
        for b in batches:
            # forward-mode AD passes only through the math SDPA backend
            with sdpa_kernel(SDPBackend.MATH):
                _, jv = jvp(logits(b), (primals,), (tangents,))
            _, pullback = vjp(logits(b), primals)
            pullback(jv)

    rows.guard("torch.func", "floor/jvp+vjp",
               lambda: rows.product("torch.func", "floor/jvp+vjp", jvp_vjp))


OPERATORS = {
    # name: (class, keyword); exact ones first (forward over reverse goes through the
    # Triton attention on CUDA, double backward through math SDPA)
    "hessian/forward_over_reverse": ("HessianOperator", {"method": "forward_over_reverse"}),
    "hessian/autograd": ("HessianOperator", {"method": "autograd"}),
    "hessian/finite_difference": ("HessianOperator", {"method": "finite_difference"}),
    "ggn/forward": ("GGNOperator", {"jvp": "forward"}),
    "ggn/finite_difference": ("GGNOperator", {"jvp": "finite_difference"}),
}


def operator(name: str, model, batches):
    cls, kw = OPERATORS[name]
    return getattr(torchcurv, cls)(model, torchcurv.causal_lm_objective(), batches, **kw)


def torchcurv_products(rows: Rows, model, batches, k: int) -> dict[str, dict]:
    """One product and a block of ``k`` for every operator; the rows that ran, by name."""
    measured: dict[str, dict] = {}
    for name in OPERATORS:
        def run(name=name):
            op = operator(name, model, batches)
            v = torch.randn(op.n, device=rows.device, dtype=op.dtype)
            resident_one = gpu_allocated(rows.device)
            one = rows.product("torchcurv", name, lambda op=op, v=v: op @ v)
            del v  # not resident while the block runs
            V = torch.randn(op.n, k, device=rows.device, dtype=op.dtype)
            resident = gpu_allocated(rows.device)
            block = rows.once("torchcurv", f"{name}/block{k}", lambda op=op, V=V: op @ V)
            measured[name] = {"seconds": one["seconds"], "peak_gib": one["peak_gib"],
                              "block_peak_gib": block["peak_gib"]}
            memory_prediction(rows, name, op, one, block, resident_one, resident, k)

        rows.guard("torchcurv", name, run)
    return measured


def gpu_allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def memory_prediction(rows: Rows, name: str, op, one: dict, block: dict,
                      resident_one: int | None, resident: int | None, k: int) -> None:
    """``op.memory_estimate`` (item 5) against the peaks just measured: one vector, and
    the block of ``k`` when it ran as one product (its budget held the prediction).

    The block's own sub-blocks measured the points the estimate comes from, so this costs
    no product. Peaks are absolute (everything resident), the estimate is above what was
    allocated when its product started: the row adds back what was allocated when the
    one-vector product started (model, data, the vector) and, for the block, when the
    block started (its ``k`` vectors too).
    """
    if (resident is None or resident_one is None or one["peak_gib"] is None
            or block["peak_gib"] is None):
        return
    gib = 2**30
    est1, estk = op.memory_estimate(1), op.memory_estimate(k)
    whole = any(m == k for m, _ in estk.measured)
    predicted_one = (resident_one + est1.bytes) / gib
    predicted_block = (resident + estk.bytes) / gib
    rows.emit(lib="torchcurv", what=f"{name}/memory_estimate",
              measured_points=[[m, b / gib] for m, b in estk.measured],
              resident_one_gib=resident_one / gib, resident_gib=resident / gib,
              predicted_one_gib=predicted_one, measured_one_gib=one["peak_gib"],
              one_error=predicted_one / one["peak_gib"] - 1,
              predicted_block_gib=predicted_block, measured_block_gib=block["peak_gib"],
              # the prediction for k is only tested by a block that ran as one product
              # of k (then it is a measured point); split, it peaked at a sub-block's size
              block_ran_whole=whole,
              block_error=predicted_block / block["peak_gib"] - 1 if whole else None,
              per_vector_gib=estk.per_vector_bytes / gib, fixed_gib=estk.fixed_bytes / gib)


def peer_products(rows: Rows, model, batches) -> None:
    for method in ("autograd", "finite_difference"):
        def run(method=method):
            import hessian_eigenthings as he

            H = he.HessianOperator(model, batches, he.hf_lm_loss(), method=method)
            v = torch.randn(H.size, device=rows.device, dtype=H.dtype)
            rows.product("hessian_eigenthings", f"hessian/{method}", lambda: H.matvec(v))

        rows.guard("hessian_eigenthings", f"hessian/{method}", run)


# -- planning the solves ----------------------------------------------------------------

def row_seconds(n: int, device: torch.device, basis_device: torch.device,
                basis_dtype: torch.dtype) -> float:
    """Seconds to bring one stored basis vector to the device in the arithmetic's dtype,
    the unit of a Lanczos step's Gram-Schmidt cost (host-resident bases cross PCIe, from
    pinned memory as :class:`~torchcurv.algorithms.krylov.KrylovBasis` keeps them)."""
    pinned = basis_device.type == "cpu" and device.type == "cuda"
    row = torch.zeros(n, dtype=basis_dtype, device=basis_device, pin_memory=pinned)
    return timed(lambda row=row: row.to(device, torch.float32), device, reps=2, warmup=1)


def lanczos_plan(n: int, k: int, ncv: int, product_s: float, row_s: float,
                 budget_s: float, cap: int) -> dict:
    """Products and seconds of a thick-restart Lanczos solve that fits ``budget_s``.

    A cycle adds ``ncv - kept`` vectors (``kept`` Ritz vectors are kept at each restart,
    as :func:`torchcurv.algorithms.lanczos._keep_count` says), every step costs one
    product and a Gram-Schmidt of three sweeps over about ``ncv`` stored vectors (each
    sweep converts every stored vector, piece by piece: ~1 row time), and each
    residual check multiplies ``k`` vectors. ``maxiter`` is the number of restarts that
    fit, at least 1 and at most ``cap``.
    """
    new = ncv - _keep_count(k, 1, ncv, ncv)
    step_s = product_s + 3 * ncv * row_s
    first_s = ncv * step_s + k * product_s
    maxiter = int(max(1, min(cap, (budget_s - first_s) // max(new * step_s, 1e-9))))
    products = ncv + maxiter * new + k
    return {"ncv": ncv, "maxiter": maxiter, "new_per_restart": new, "step_s": step_s,
            "max_products": products, "planned_s": ncv * step_s + maxiter * new * step_s
            + k * product_s}


def choose(candidates: list[str], measured: dict[str, dict], basis_gib: float,
           total_gib: float | None) -> tuple[str, str] | None:
    """The first candidate (exact first) whose one-vector peak fits beside a
    device-resident basis, else the first that fits beside nothing (basis on the host);
    ``None`` if no candidate ran. Off CUDA (no peaks) the first that ran, basis on its
    device.

    The one-vector peak, not the block's: a solve steps one vector at a time, and its
    residual check's block is split to the free memory by the operators' default
    ``max_memory="auto"``. Exact first because finite differences in bfloat16 are off
    by about 1e-1 relative (``product_accuracy.py``), above the solve's tolerance."""
    ran = [c for c in candidates if c in measured]
    if not ran:
        return None
    if total_gib is None:
        return ran[0], "device"
    for c in ran:
        if measured[c]["peak_gib"] + basis_gib <= FIT * total_gib:
            return c, "device"
    for c in ran:
        if measured[c]["peak_gib"] <= FIT * total_gib:
            return c, "cpu"
    return None


def solve_row(rows: Rows, what: str, op, res, setting: dict, peak, extra=None) -> None:
    lam = res.eigenvalues
    rel = (res.residuals / lam.abs().clamp_min(torch.finfo(torch.float64).tiny)).tolist()
    info = res.info
    rows.emit(lib="torchcurv", what=what, **setting, k=len(lam), tol=res.tol,
              seconds=res.wall_time, num_matvecs=res.num_matvecs,
              seconds_per_matvec=res.wall_time / max(res.num_matvecs, 1),
              check_matvecs=info.check_matvecs, restarts=info.restarts,
              stop_reason=info.stop_reason, eigenvalues=lam.flip(0).tolist(),
              relative_residuals=rel[::-1], converged=res.converged.flip(0).tolist(),
              all_converged=res.all_converged,
              basis_gib=None if info.basis_bytes is None else info.basis_bytes / 2**30,
              basis_device=str(info.basis_device), basis_dtype=str(info.basis_dtype),
              peak_gib=peak, peak_ratio_to_train_step=ratio(peak, rows.train_peak),
              **host_gib(), **(extra or {}))


def run_solve(rows: Rows, what: str, op, k: int, tol: float, plan: dict, basis_device: str,
              basis_dtype: torch.dtype | None = None, setting: dict | None = None):
    """``eigsh(backend="lanczos")`` with the plan's ``ncv`` / ``maxiter``; one row."""
    device = rows.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = torchcurv.eigsh(op, k=k, which="LA", backend="lanczos", tol=tol, seed=0,
                          ncv=plan["ncv"], maxiter=plan["maxiter"],
                          basis_device=op.device if basis_device == "device" else basis_device,
                          basis_dtype=basis_dtype,
                          # the true residuals still come back, checked one vector at a
                          # time: k model-sized vectors beside the basis and a product
                          # did not fit for the 1.1B Hessian
                          return_eigenvectors=False)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    solve_row(rows, what, op, res, {**(setting or {}), "ncv": plan["ncv"],
                                    "maxiter": plan["maxiter"]}, peak)
    return res


# -- item 3 ------------------------------------------------------------------------------

def billion(args, device: torch.device, deadline: float) -> None:
    shape, vocab = (QUICK_LLAMA if args.quick else LLAMA)["1.1b"], (
        QUICK_VOCAB if args.quick else VOCAB)
    dtype = getattr(torch, args.dtype)
    model = llama(shape, vocab, device, dtype, args.seq_len)
    batches = token_batches(vocab, args.batch, args.seq_len, device)
    rows = Rows("llama-1.1b" + ("(quick)" if args.quick else ""), model, batches, device,
                args.reps)
    baselines(rows, model, batches)
    floors(rows, model, batches)
    measured = torchcurv_products(rows, model, batches, args.k)
    peer_products(rows, model, batches)
    free(device)

    n, k = rows.ctx["nparams"], args.k
    total_gib = None if gpu_bytes(device) is None else gpu_bytes(device) / 2**30
    itemsize = torch.finfo(dtype).bits // 8
    basis_gib = args.ncv * n * itemsize / 2**30
    slq_gib = args.slq_steps * n * itemsize / 2**30
    stages = {"ggn": ["ggn/forward", "ggn/finite_difference"],
              "hessian": ["hessian/forward_over_reverse", "hessian/autograd",
                          "hessian/finite_difference"]}
    remaining = deadline - time.perf_counter()
    # SLQ's share is fixed by its size; the two solves split the rest equally
    plans: dict[str, dict] = {}
    choice = {m: choose(c, measured, basis_gib, total_gib) for m, c in stages.items()}
    slq_choice = choose(stages["hessian"], measured, slq_gib, total_gib)
    if slq_choice is not None and slq_choice[1] == "cpu":
        slq_choice = None  # spectral_density keeps its basis on the operator's device
    slq_s = 0.0
    if slq_choice is not None:
        product_s = measured[slq_choice[0]]["seconds"]
        row_s = row_seconds(n, device, device, dtype)
        slq_s = args.slq_probes * args.slq_steps * (product_s + 3 * args.slq_steps * row_s)
        plans["slq"] = {"method": slq_choice[0], "products": args.slq_probes * args.slq_steps,
                        "planned_s": slq_s}
    for matrix, c in choice.items():
        if c is None:
            continue
        name, where = c
        basis_device = device if where == "device" else torch.device("cpu")
        row_s = row_seconds(n, device, basis_device, dtype)
        plans[matrix] = {"method": name, "basis_device": where, **lanczos_plan(
            n, k, args.ncv, measured[name]["seconds"], row_s,
            max(0.0, (remaining - slq_s) / 2), args.maxiter)}
    rows.emit(what="plan", budget_s=args.budget_s, remaining_s=remaining,
              basis_gib=basis_gib, slq_basis_gib=slq_gib, gpu_gib=total_gib, plans=plans,
              planned_s=sum(p["planned_s"] for p in plans.values()),
              not_planned=[m for m in (*stages, "slq") if m not in plans])

    results = {}
    for matrix, plan in plans.items():
        if matrix == "slq":
            continue

        def solve(matrix=matrix, plan=plan):
            op = operator(plan["method"], model, batches)
            results[matrix] = run_solve(
                rows, f"{matrix}/top{k}", op, k, TOL[dtype], plan, plan["basis_device"],
                setting={"method": plan["method"]})

        left = deadline - time.perf_counter()
        if plan["planned_s"] > left:
            # even its first basis would outlast the call: say so instead of starting it
            rows.emit(lib="torchcurv", what=f"{matrix}/top{k}",
                      skipped=f"planned {plan['planned_s']:.0f} s > {max(left, 0):.0f} s left")
        else:
            rows.guard("torchcurv", f"{matrix}/top{k}", solve)

    def density():
        op = operator(plans["slq"]["method"], model, batches)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        d = torchcurv.spectral_density(op, num_probes=args.slq_probes,
                                       lanczos_steps=args.slq_steps, seed=0,
                                       probes_per_matmat=1)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" \
            else None
        top = results.get("hessian")
        figure = Path(args.figures) / f"lm_billion_hessian_density{args.tag}.png"
        draw_density(d, figure, None if top is None else top.eigenvalues, rows.ctx,
                     plans["slq"]["method"])
        mean, err = d.moment(1)
        rows.emit(lib="torchcurv", what="hessian/slq_density", method=plans["slq"]["method"],
                  num_probes=d.num_probes, lanczos_steps=d.nodes.shape[1],
                  num_matvecs=d.num_matvecs, seconds=d.wall_time, peak_gib=peak,
                  peak_ratio_to_train_step=ratio(peak, rows.train_peak),
                  node_range=[float(d.nodes.min()), float(d.nodes.max())],
                  trace_over_n=mean, trace_over_n_stderr=err, sigma=d.sigma,
                  figure=str(figure),
                  # the quadrature rules themselves, so the picture can be redrawn
                  nodes=d.nodes.tolist(), weights=d.weights.tolist())

    if "slq" in plans and time.perf_counter() < deadline:
        rows.guard("torchcurv", "hessian/slq_density", density)


def draw_density(d, figure: Path, eigenvalues, ctx: dict, method: str) -> None:
    d.plot(figure, eigenvalues=eigenvalues,
           model=f"{ctx['model']} {ctx['dtype']}, random init, Hessian ({method})")


def redraw(results: Path, figures: Path, tag: str) -> None:
    """The density picture again from a run's JSON lines (its quadrature rules and the
    Hessian's top eigenvalues), without a GPU: after a change to how pictures are drawn."""
    from torchcurv.algorithms.spectral import SpectralDensity, broaden

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    slq = next(r for r in rows if r.get("what") == "hessian/slq_density" and "nodes" in r)
    top = next((r for r in rows if r.get("what") == "hessian/top10" and "eigenvalues" in r
                and r.get("model") == slq["model"]), None)
    nodes = torch.tensor(slq["nodes"], dtype=torch.float64)
    weights = torch.tensor(slq["weights"], dtype=torch.float64)
    grid, density, sigma = broaden(nodes, weights, sigma=slq["sigma"], linear_width=None)
    d = SpectralDensity(nodes=nodes, weights=weights, grid=grid, density=density,
                        sigma=sigma, log_scale=False, linear_width=None, n=slq["nparams"],
                        num_matvecs=slq["num_matvecs"], wall_time=slq["seconds"])
    figure = figures / f"lm_billion_hessian_density{tag}.png"
    draw_density(d, figure, None if top is None else top["eigenvalues"], slq, slq["method"])
    print(figure)


# -- GPT-2 small beside hessian-eigenthings ---------------------------------------------

def gpt2_beside_peer(args, device: torch.device) -> None:
    seq_len = 32 if args.quick else 1024
    model = gpt2_small(device, args.quick, seq_len)
    batches = token_batches(model.config.vocab_size, 2 if args.quick else 4, seq_len, device)
    rows = Rows("gpt2-small" + ("(quick)" if args.quick else ""), model, batches, device,
                args.reps)
    baselines(rows, model, batches)
    k, tol = args.k, TOL[torch.float32]
    H = torchcurv.HessianOperator(model, torchcurv.causal_lm_objective(), batches)
    v = torch.randn(H.n, device=device)
    rows.guard("torchcurv", "hessian/autograd",
               lambda: rows.product("torchcurv", "hessian/autograd", lambda: H @ v))
    done = {}

    def ours():
        plan = {"ncv": 2 * k + 1, "maxiter": args.maxiter}
        done["res"] = run_solve(rows, f"hessian/top{k}", H, k, tol, plan, "device",
                                setting={"method": "hessian/autograd", "attn": "sdpa"})

    rows.guard("torchcurv", f"hessian/top{k}", ours)

    def peer(attn: str, max_iter: int | None):
        import hessian_eigenthings as he

        model.set_attn_implementation(attn)
        Hh = he.HessianOperator(model, batches, he.hf_lm_loss())
        res = {}
        rows.once("hessian_eigenthings", f"hessian/top{k}",
                  lambda: res.setdefault("r", he.lanczos(Hh, k=k, max_iter=max_iter,
                                                         tol=tol, which="LA", seed=0,
                                                         reorthogonalize=True)),
                  attn=attn, max_iter=max_iter or 2 * k, api="hessian_eigenthings.lanczos")
        r = res["r"]
        lam = r.eigenvalues.double().cpu()
        vectors = r.eigenvectors.T.to(H.dtype)  # (n, k)
        with H.uncounted():  # torchcurv's exact Hessian checks the peer's pairs
            true = (H @ vectors - vectors * lam.to(device, H.dtype)).double().norm(dim=0).cpu()
        rel = true / lam.abs().clamp_min(torch.finfo(torch.float64).tiny)
        rows.emit(lib="hessian_eigenthings", what=f"hessian/top{k}/verdict", attn=attn,
                  max_iter=max_iter or 2 * k, eigenvalues=lam.tolist(),
                  own_residual_estimates=r.residuals.double().cpu().tolist(),
                  own_converged=r.converged.cpu().tolist(),
                  relative_residuals=rel.tolist(), converged=(rel <= tol).tolist(), tol=tol)

    ours_matvecs = done["res"].num_matvecs if "res" in done else None
    try:
        for attn in ("sdpa", "eager"):
            for max_iter in (None, ours_matvecs):  # its default (2k steps), and ours' count
                if max_iter is not None and (max_iter <= 2 * k or attn == "sdpa"):
                    continue  # sdpa: the peer's double backward fails at any length
                rows.guard("hessian_eigenthings", f"hessian/top{k}",
                           lambda attn=attn, max_iter=max_iter: peer(attn, max_iter))
    finally:
        model.set_attn_implementation("sdpa")


# -- item 4 ------------------------------------------------------------------------------

def largest(args, device: torch.device, deadline: float) -> None:
    shapes, vocab = (QUICK_LLAMA, QUICK_VOCAB) if args.quick else (LLAMA, VOCAB)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.finfo(dtype).bits // 8
    k = args.k_largest
    host_bytes = args.host_gib * 2**30
    sizes = args.sizes
    counts = {}
    for size in sizes:  # parameter counts from the shapes, to share the budget
        with torch.device("meta"):
            counts[size] = nparams(llama(shapes[size], vocab, torch.device("meta"), dtype,
                                         args.seq_len))
    exact_peak_per_param = None
    for i, size in enumerate(sizes):
        n = counts[size]
        ctx = dict(model=f"llama-{size}" + ("(quick)" if args.quick else ""), nparams=n,
                   dtype=args.dtype, tokens=args.batch * args.seq_len)
        remaining = deadline - time.perf_counter()
        budget = remaining * n / sum(counts[s] for s in sizes[i:])
        ncv = min(args.ncv_largest, int(FIT * host_bytes // (n * itemsize)))
        if ncv < k + 1:
            emit(**ctx, what=f"hessian/top{k}", failed=True,
                 error=f"host memory: a Lanczos basis of k + 1 = {k + 1} bfloat16 vectors "
                       f"needs {(k + 1) * n * itemsize / 2**30:.3g} GiB, more than "
                       f"{FIT:.0%} of --host-gib {args.host_gib}")
            return
        if budget <= 0:
            emit(**ctx, what=f"hessian/top{k}", failed=True,
                 error=f"time: no budget left of --budget-s {args.budget_s}")
            return
        ok = {}

        def one_size(size=size, n=n, ctx=ctx, budget=budget, ncv=ncv, ok=ok,
                     exact_peak_per_param=exact_peak_per_param):
            global_start = time.perf_counter()
            model = llama(shapes[size], vocab, device, dtype, args.seq_len)
            batches = token_batches(vocab, args.batch, args.seq_len, device)
            rows = Rows(ctx["model"], model, batches, device, reps=1)
            total = gpu_bytes(device)
            methods = ["hessian/forward_over_reverse", "hessian/autograd",
                       "hessian/finite_difference"]
            if (exact_peak_per_param is not None and total is not None
                    and exact_peak_per_param * n > FIT * total):
                methods = methods[-1:]  # the smaller model's exact product scaled: no room
            chosen = None
            for name in methods:
                op = operator(name, model, batches)
                v = torch.randn(op.n, device=device, dtype=op.dtype)
                try:
                    row = rows.once("torchcurv", f"{name}/product",
                                    lambda op=op, v=v: op @ v)
                except torch.OutOfMemoryError as exc:
                    rows.emit(lib="torchcurv", what=f"{name}/product", failed=True,
                              error=repr(exc)[:300])
                    del op, v
                    free(device)
                    continue
                del v
                chosen = (name, op, row)
                break
            if chosen is None:
                raise RuntimeError("no Hessian product fits in GPU memory")
            name, op, row = chosen
            if row["peak_gib"] is not None and name != "hessian/finite_difference":
                ok["exact_peak_per_param"] = row["peak_gib"] * 2**30 / n
            spent = time.perf_counter() - global_start
            row_s = row_seconds(n, device, torch.device("cpu"), dtype)
            plan = lanczos_plan(n, k, ncv, row["seconds"], row_s, budget - spent, args.maxiter)
            rows.emit(what="plan", budget_s=budget, method=name, row_seconds=row_s,
                      basis_host_gib=ncv * n * itemsize / 2**30, **plan)
            res = run_solve(rows, f"hessian/top{k}", op, k, TOL[dtype], plan, "cpu",
                            basis_dtype=dtype, setting={"method": name})
            ok["converged"] = res.all_converged

        guarded(ctx["model"], "torchcurv", one_size, what=f"hessian/top{k}", failed=True,
                **ctx)
        free(device)
        if "converged" not in ok:
            return  # the row above says why this size failed
        exact_peak_per_param = ok.get("exact_peak_per_param", exact_peak_per_param)


# -- command line ------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny LLaMA/GPT-2 configs on the CPU: a smoke run of seconds")
    ap.add_argument("--largest", action="store_true",
                    help="item 4: LLaMA sizes in turn, top-5 Hessian eigenvalues, host basis")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (2048)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per product")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ncv", type=int, default=21)
    ap.add_argument("--maxiter", type=int, default=40, help="most restarts of a solve")
    ap.add_argument("--slq-probes", type=int, default=2)
    ap.add_argument("--slq-steps", type=int, default=24)
    ap.add_argument("--only", choices=["llama", "gpt2"], default=None)
    ap.add_argument("--k-largest", type=int, default=5)
    ap.add_argument("--ncv-largest", type=int, default=10)
    ap.add_argument("--sizes", nargs="+", default=list(LLAMA), choices=list(LLAMA))
    ap.add_argument("--host-gib", type=float, default=128.0,
                    help="host memory of the machine (the H200 machine's 128 GiB)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds the run may take (default 540, --quick 120)")
    ap.add_argument("--figures", default="benchmarks/results", help="folder of the PNG")
    ap.add_argument("--tag", default="", help="suffix of the figure's file name")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--redraw", default=None, metavar="RESULTS.jsonl",
                    help="only draw the density picture again from a run's results")
    args = ap.parse_args()
    if args.redraw:
        redraw(Path(args.redraw), Path(args.figures), args.tag)
        return
    device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lm_billion.py needs a CUDA GPU; --quick runs tiny configs on the CPU")
    args.batch = args.batch or 2
    args.seq_len = args.seq_len or (32 if args.quick else 2048)
    args.budget_s = args.budget_s or (120.0 if args.quick else 540.0)
    if args.quick:
        args.ncv, args.slq_steps = min(args.ncv, 21), min(args.slq_steps, 12)
    write_to(args.out)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.budget_s
    gpt2_s = 10 if args.quick else 90  # GPT-2 small's part on an H200, kept out of 1.1B's
    emit(what="machine", **machine(device), mode="largest" if args.largest else "billion",
         quick=args.quick, budget_s=args.budget_s, host_gib=args.host_gib,
         gpu_gib=None if gpu_bytes(device) is None else gpu_bytes(device) / 2**30)
    if args.largest:
        largest(args, device, deadline)
    else:
        if args.only in (None, "llama"):
            guarded("llama-1.1b", "setup", lambda: billion(
                args, device, deadline - (0 if args.only else gpt2_s)), what="setup")
        if args.only in (None, "gpt2"):
            guarded("gpt2-small", "setup", lambda: gpt2_beside_peer(args, device),
                    what="setup")
    emit(what="done", seconds=time.perf_counter() - start, **host_gib())


if __name__ == "__main__":
    main()
