"""Curvature products at language-model scale: cost and peak memory against one gradient.

A 4-layer GPT-2-style model built from a config (n_embd 256, vocabulary 50257, one batch
of B=8 sequences of T=256 tokens, random weights, float32; ``common.gpt2_problem``), with
``attn_implementation`` "eager" and "sdpa". Measured, each beside one gradient
(``loss.backward()``) and one training step (forward, backward, AdamW step) of the same
model in the same run:

- HVP matvec (``HessianOperator``, autograd) and matmat(16) per vector;
- GGN matvec (``GGNOperator`` with ``causal_lm_objective``, ``jvp="forward"`` and
  ``"finite_difference"``) and matmat(16) per vector;
- peak memory of each (``torch.cuda.max_memory_allocated``, everything resident included);
- hessian-eigenthings' HVP beside it (an error it raises is recorded, not fatal);
- the top-10 GGN eigenvalues by ``torchcurv.eigsh(backend="lanczos")``: time and matvecs.

Target (issue 6): GGN matvec <= 3x one gradient and peak memory <= 1.5x one training step
(hessian-eigenthings' GGN: 5.3x and 5.4 GiB on an H100).

    python benchmarks/lm_scale.py --out lm_scale.jsonl                 # GPU
    python benchmarks/lm_scale.py --microbatch-size 2 --out lm_mb.jsonl
    python benchmarks/lm_scale.py --tiny --device cpu                   # seconds, smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from common import emit, gpt2_problem, guarded, machine, peak_gib, sync, timed, write_to

import torchcurv

GGN_JVPS = ("forward", "finite_difference")


def _train_step(model, batches):
    """One optimizer step's peak memory; the weights are restored afterwards."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        for b in batches:
            model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return peak_gib(next(model.parameters()).device, step)
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])


def _record(ctx, lib, method, matvec, matmat, n, device, base, reps):
    """Time and peak of one matvec and (when given) of matmat(16), as ratios to ``base``."""
    v = torch.randn(n, device=device)
    t = timed(lambda: matvec(v), device, reps=reps, warmup=1)
    peak = peak_gib(device, lambda: matvec(v))
    emit(**ctx, lib=lib, method=method, what="matvec", ms=t * 1e3,
         ratio_to_grad=t / base["grad_s"], peak_gib=peak,
         peak_ratio_to_train_step=_ratio(peak, base["train_peak_gib"]))
    if matmat is None:
        return
    V = torch.randn(n, 16, device=device)
    t16 = timed(lambda: matmat(V), device, reps=max(1, reps // 2), warmup=1)
    peak16 = peak_gib(device, lambda: matmat(V))
    emit(**ctx, lib=lib, method=method, what="matmat16", ms=t16 * 1e3,
         ms_per_vec=t16 * 1e3 / 16, ratio_per_vec_to_grad=t16 / 16 / base["grad_s"],
         peak_gib=peak16, peak_ratio_to_train_step=_ratio(peak16, base["train_peak_gib"]))


def _ratio(a, b):
    return None if a is None or not b else a / b


def bench(device, tiny, reps, attn, microbatch_size, eigsh_jvp, k):
    model, batches = gpt2_problem(device, tiny, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = dict(problem="gpt2", attn=attn, microbatch_size=microbatch_size)

    def grad():
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    base = {"grad_s": timed(grad, device, reps=reps)}
    base["grad_peak_gib"] = peak_gib(device, grad)
    base["train_peak_gib"] = _train_step(model, batches)
    emit(**ctx, what="gradient", ms=base["grad_s"] * 1e3, peak_gib=base["grad_peak_gib"],
         train_step_peak_gib=base["train_peak_gib"], nparams=sum(p.numel() for p in params),
         tokens=sum(b["input_ids"].numel() for b in batches))

    objective = torchcurv.causal_lm_objective()
    kw = {"microbatch_size": microbatch_size}

    def hvp():
        H = torchcurv.HessianOperator(model, objective, batches, **kw)
        _record(ctx, "torchcurv", "hvp/autograd", H.matvec, H.matmat, H.n, device, base, reps)

    where = f"gpt2/{attn}"
    guarded(where, "torchcurv", hvp)
    for jvp in GGN_JVPS:
        def ggn(jvp=jvp):
            G = torchcurv.GGNOperator(model, objective, batches, jvp=jvp, **kw)
            _record(ctx, "torchcurv", f"ggn/{jvp}", G.matvec, G.matmat, G.n, device, base,
                    reps)

        guarded(where, "torchcurv", ggn)

    def eigenthings():
        import hessian_eigenthings as he

        Hh = he.HessianOperator(model, batches, he.hf_lm_loss())
        _record(ctx, "hessian_eigenthings", "hvp", Hh.matvec, None, Hh.size, device, base,
                reps)

    guarded(where, "hessian_eigenthings", eigenthings)

    def top_eigenvalues():
        G = torchcurv.GGNOperator(model, objective, batches, jvp=eigsh_jvp, **kw)
        sync(device)
        t0 = time.perf_counter()
        res = torchcurv.eigsh(G, k=k, which="LA", backend="lanczos", tol=1e-3, seed=0,
                              return_eigenvectors=False)
        sync(device)
        wall = time.perf_counter() - t0
        emit(**ctx, lib="torchcurv", method=f"eigsh/lanczos/ggn/{eigsh_jvp}",
             what=f"top{k}", s=wall, num_matvecs=res.num_matvecs,
             s_per_matvec=wall / max(res.num_matvecs, 1),
             eigenvalues=res.eigenvalues.flip(0).tolist(), info=res.info.as_dict())

    if k > 0:
        guarded(where, "torchcurv", top_eigenvalues)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true",
                    help="2 layers, width 32, vocabulary 500, B=2, T=32: a CPU smoke run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"])
    ap.add_argument("--microbatch-size", type=int, default=None,
                    help="split each batch into microbatches of this many sequences")
    ap.add_argument("--eigsh-jvp", default="forward", choices=GGN_JVPS)
    ap.add_argument("--k", type=int, default=10, help="top GGN eigenvalues (0: skip)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device(args.device)
    emit(what="machine", **machine(device))
    for attn in args.attn:
        guarded("gpt2", "setup", lambda attn=attn: bench(
            device, args.tiny, args.reps, attn, args.microbatch_size, args.eigsh_jvp, args.k))


if __name__ == "__main__":
    main()
