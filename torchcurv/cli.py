"""``torchcurv`` command line: ``demo`` (the embedded default) and ``spectrum`` (your model).

    torchcurv demo [--quiet] [--json] [--png PATH] [--device cpu|cuda]
    torchcurv spectrum --hf CONFIG_OR_CHECKPOINT_DIR | --module pkg.mod:function
                       [--matrix hessian|ggn|ef|fisher] [--k 10] [--which LA]
                       [--backend lanczos] [--params "blocks.*.attn.*"] [--device cuda]
                       [--json PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

MATRICES = ("hessian", "ggn", "ef", "fisher")


class CLIError(Exception):
    """A problem the user can act on; printed without a traceback."""


class Reporter:
    """Human-readable lines on stdout, progress on stderr, or one JSON document."""

    def __init__(self, quiet: bool, as_json: bool) -> None:
        self.quiet, self.as_json = quiet, as_json
        self.record: dict[str, Any] = {}

    def say(self, text: str = "") -> None:
        if not self.quiet and not self.as_json:
            print(text, flush=True)

    @contextmanager
    def step(self, what: str):
        """Show a step on stderr (a tqdm bar when tqdm is installed) while it runs."""
        show = not self.quiet and sys.stderr.isatty()
        bar = None
        if show:
            try:
                from tqdm import tqdm

                bar = tqdm(total=1, desc=what, file=sys.stderr, leave=False,
                           bar_format="{desc}: {elapsed}")
            except ImportError:
                print(f"{what} ...", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            if bar is not None:
                bar.update(1)
                bar.close()


def _operator(matrix: str, model, criterion, data, params: str | None, **kw):
    import torchcurv

    classes = {
        "hessian": "HessianOperator",
        "ggn": "GGNOperator",
        "ef": "EmpiricalFisherOperator",
        "fisher": "MCFisherOperator",
    }
    cls = getattr(torchcurv, classes[matrix], None)
    if cls is None:
        raise CLIError(f"this torchcurv build has no {classes[matrix]}")
    return cls(model, criterion, data, param_filter=params, **kw)


def _eig_rows(results) -> list[dict]:
    return [
        {
            "backend": r.backend,
            "eigenvalues": sorted(r.eigenvalues.tolist(), reverse=True),
            "max_relative_residual": float(
                (r.residuals / r.eigenvalues.abs().clamp_min(1e-300)).max()
            ),
            "converged": int(r.converged.sum()),
            "num_matvecs": r.num_matvecs,
            "seconds": r.wall_time,
        }
        for r in results
    ]


def _print_eig_table(rep: Reporter, rows: list[dict], k: int) -> None:
    shown = min(k, 5)
    head = f"{'backend':<10}" + "".join(f"{'λ' + str(i + 1):>12}" for i in range(shown))
    head += f"{'max rel res':>13}{'conv':>6}{'matvecs':>9}{'time s':>9}"
    rep.say(head)
    for r in rows:
        vals = "".join(f"{v:>12.6g}" for v in r["eigenvalues"][:shown])
        rep.say(f"{r['backend']:<10}{vals}{r['max_relative_residual']:>13.1e}"
                f"{r['converged']:>4}/{k}{r['num_matvecs']:>9}{r['seconds']:>9.3f}")


def _spectrum(rep: Reporter, op, *, k: int, which: str, backends: list[str], tol: float,
              png: Path | None, label: str, trace_matvecs: int, seed: int) -> None:
    import torchcurv

    results = []
    for backend in backends:
        with rep.step(f"{label}: top-{k} {which} eigenpairs via {backend}"):
            results.append(torchcurv.eigsh(op, k=k, which=which, backend=backend, tol=tol,
                                           seed=seed))
    rows = _eig_rows(results)
    rep.record.setdefault("matrices", {})[label] = {"n": op.n, "eigsh": rows}
    rep.say(f"\n{label} ({op.n} x {op.n}): top {k} eigenvalues ({which}), tol {tol:g}")
    _print_eig_table(rep, rows, k)
    if len(rows) > 1:
        ref = rows[0]["eigenvalues"]
        worst = max(abs(a - b) / max(abs(b), 1e-300)
                    for r in rows[1:] for a, b in zip(r["eigenvalues"], ref))
        rep.say(f"largest relative disagreement between backends: {worst:.1e}")
        rep.record["matrices"][label]["max_backend_disagreement"] = worst
    with rep.step(f"{label}: trace by Hutch++"):
        tr = torchcurv.trace(op, num_matvecs=trace_matvecs, method="hutch++", seed=seed)
    rep.say(f"trace (Hutch++, {tr.num_matvecs} matvecs): {tr.estimate:.6g} ± "
            f"{tr.std_error:.2g} (1 s.e.)")
    rep.record["matrices"][label]["trace"] = {
        "estimate": float(tr.estimate), "std_error": float(tr.std_error),
        "num_matvecs": tr.num_matvecs, "method": "hutch++",
    }
    if png is not None:
        with rep.step(f"{label}: spectral density (stochastic Lanczos quadrature)"):
            density = torchcurv.spectral_density(op, num_probes=8, lanczos_steps=60,
                                                 seed=seed)
            density.plot(png, title=f"{label} spectral density")
        rep.say(f"spectral density picture: {png.resolve()}")
        rep.record["matrices"][label]["spectral_density_png"] = str(png.resolve())


def _default_backends(device: torch.device) -> list[str]:
    backends = ["arpack", "lanczos", "block"]
    if device.type == "cuda":
        try:
            import cupy  # noqa: F401

            backends.append("cupy")
        except ImportError:
            pass
    return backends


def run_demo(args: argparse.Namespace) -> int:
    from torchcurv.demo import demo_problem

    rep = Reporter(args.quiet, args.json)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    with rep.step("building the demo model (20-32-32-5 MLP on synthetic data)"):
        model, criterion, data = demo_problem(device=str(device))
    rep.say("torchcurv demo: a small MLP (20-32-32-5, tanh) briefly trained on a synthetic "
            "5-class problem,\n1024 samples in 4 batches, float64, "
            f"{sum(p.numel() for p in model.parameters())} parameters, device {device}")
    backends = args.backends.split(",") if args.backends else _default_backends(device)
    png = Path(args.png) if args.png else None
    import torchcurv

    for label, cls in (("Hessian", torchcurv.HessianOperator),
                       ("GGN", getattr(torchcurv, "GGNOperator", None))):
        if cls is None:
            continue
        op = cls(model, criterion, data)
        out = None if png is None else png.with_name(f"{png.stem}-{label.lower()}{png.suffix}")
        _spectrum(rep, op, k=args.k, which="LA", backends=backends, tol=args.tol, png=out,
                  label=label, trace_matvecs=args.trace_matvecs, seed=args.seed)
    rep.record["seconds"] = time.perf_counter() - t0
    rep.say(f"\ndone in {rep.record['seconds']:.1f} s")
    if args.json:
        print(json.dumps(rep.record, indent=2))
    return 0


def _load_module_problem(spec: str):
    if ":" not in spec:
        raise CLIError(f"--module takes 'package.module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {mod_name!r}: {exc}") from exc
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise CLIError(f"{mod_name!r} has no function {fn_name!r}")
    problem = fn()
    if not (isinstance(problem, tuple) and len(problem) == 3):
        raise CLIError(f"{spec} must return (model, criterion, data), got {type(problem)}")
    return problem


def _load_hf_problem(path: str, device: torch.device, seq_len: int, batches: int):
    try:
        import transformers
    except ImportError as exc:
        raise CLIError("--hf needs transformers: pip install 'torchcurv[hf]'") from exc
    from torchcurv.models import causal_lm_objective

    p = Path(path)
    if not p.is_dir():
        raise CLIError(f"--hf expects a local directory with config.json, got {path!r}")
    try:
        if any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")):
            model = transformers.AutoModelForCausalLM.from_pretrained(p)
        else:
            config = transformers.AutoConfig.from_pretrained(p)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise CLIError(f"cannot load a causal LM from {path!r}: {exc}") from exc
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (2, seq_len), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    return model, causal_lm_objective(), data


def run_spectrum(args: argparse.Namespace) -> int:
    rep = Reporter(args.quiet, args.json is not None)
    device = torch.device(args.device)
    if (args.hf is None) == (args.module is None):
        raise CLIError("give exactly one of --hf PATH or --module package.module:function")
    if args.hf is not None:
        model, criterion, data = _load_hf_problem(args.hf, device, args.seq_len, args.batches)
    else:
        model, criterion, data = _load_module_problem(args.module)
        model = model.to(device)
    op = _operator(args.matrix, model, criterion, data, args.params)
    png = Path(args.png) if args.png else None
    _spectrum(rep, op, k=args.k, which=args.which, backends=args.backend.split(","),
              tol=args.tol, png=png, label=args.matrix, trace_matvecs=args.trace_matvecs,
              seed=args.seed)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(rep.record, indent=2))
        rep.say(f"results: {Path(args.json).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchcurv", description="Curvature spectra of PyTorch "
                                 "models through SciPy, CuPy and torch solvers.")
    sub = ap.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    def common(p):
        p.add_argument("--k", type=int, default=5, help="number of eigenvalues")
        p.add_argument("--tol", type=float, default=1e-6, help="relative residual tolerance")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--trace-matvecs", type=int, default=60)
        p.add_argument("--device", default=default_device)
        p.add_argument("--quiet", action="store_true", help="print nothing but errors")

    demo = sub.add_parser("demo", help="the built-in demo: no downloads, seconds on a CPU")
    common(demo)
    demo.add_argument("--backends", default=None,
                      help="comma-separated eigsh backends (default: arpack,lanczos,block"
                      "[,cupy on a GPU])")
    demo.add_argument("--png", default="torchcurv-demo.png",
                      help="spectral-density picture path (one per matrix, suffixed)")
    demo.add_argument("--json", action="store_true", help="print one JSON document")
    demo.set_defaults(run=run_demo)

    spec = sub.add_parser("spectrum", help="the spectrum of your own model")
    common(spec)
    spec.add_argument("--hf", default=None, help="local HuggingFace config/checkpoint dir")
    spec.add_argument("--module", default=None, help="package.module:function returning "
                      "(model, criterion, data)")
    spec.add_argument("--matrix", choices=MATRICES, default="hessian")
    spec.add_argument("--which", default="LA", choices=["LA", "SA", "LM", "BE"])
    spec.add_argument("--backend", default="lanczos", help="eigsh backend(s), comma-separated")
    spec.add_argument("--params", default=None, help='glob on parameter names, e.g. "h.*.attn.*"')
    spec.add_argument("--seq-len", type=int, default=64, help="--hf: tokens per sequence")
    spec.add_argument("--batches", type=int, default=2, help="--hf: random-token batches")
    spec.add_argument("--json", default=None, help="write the results as JSON to this path")
    spec.add_argument("--png", default=None, help="write the spectral density picture here")
    spec.set_defaults(run=run_spectrum)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from torchcurv.errors import MissingExtraError

    try:
        return args.run(args)
    except (CLIError, MissingExtraError) as exc:
        print(f"torchcurv: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if "backend" in str(exc):
            print(f"torchcurv: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
