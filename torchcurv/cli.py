"""``torchcurv`` command line: ``demo`` (the embedded default) and ``spectrum`` (your model).

    torchcurv demo [--quick] [--quiet] [--json] [--png PATH] [--device cpu|cuda]
    torchcurv spectrum --hf CONFIG_OR_CHECKPOINT_DIR | --module pkg.mod:function
                       [--matrix hessian|ggn|ef|fisher] [--k 10] [--which LA]
                       [--backend lanczos] [--params "blocks.*.attn.*"] [--device cuda]
                       [--json PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from torchcurv.algorithms.arguments import Which
    from torchcurv.algorithms.eigsh import EigshBackend

MATRICES = ("hessian", "ggn", "ef", "fisher")
TITLES = {"hessian": "Hessian", "ggn": "GGN", "ef": "empirical Fisher", "fisher": "MC Fisher"}
WHICH_WORDS = {"LA": "largest", "SA": "smallest", "LM": "largest-magnitude",
               "SM": "smallest-magnitude", "BE": "both-end"}
HEARTBEAT_S = 10.0
"""Seconds between the one-line progress updates on a non-terminal stderr (a log file, a
batch job), so a long solve is seen to be alive without a bar's carriage returns."""


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

    def note(self, text: str) -> None:
        """One line on stderr, also with ``--json`` (stdout stays the JSON document)."""
        if not self.quiet:
            print(f"torchcurv: {text}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str):
        """Show a step on stderr while it runs: a tqdm bar on a terminal (tqdm installed),
        else a start line, a line every :data:`HEARTBEAT_S` seconds and an end line."""
        if self.quiet:
            yield
            return
        bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                bar = tqdm(total=1, desc=what, file=sys.stderr, leave=False,
                           bar_format="{desc}: {elapsed}")
            except ImportError:
                pass
        t0 = time.perf_counter()
        done = threading.Event()
        if bar is None:
            print(f"{what} ...", file=sys.stderr, flush=True)

            def beat() -> None:
                while not done.wait(HEARTBEAT_S):
                    print(f"{what} ... {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                          flush=True)

            threading.Thread(target=beat, daemon=True).start()
        try:
            yield
        finally:
            done.set()
            if bar is not None:
                bar.update(1)
                bar.close()
            else:
                print(f"{what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)


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
        raise CLIError(
            f"the torchcurv imported from {Path(torchcurv.__file__).parent} has no "
            f"{classes[matrix]}: another torchcurv (a clone's folder on PYTHONPATH or in "
            "the current directory?) shadows the installed one; run from another directory")
    try:
        return cls(model, criterion, data, param_filter=params, **kw)
    except (ValueError, TypeError) as exc:  # the operator's own checks of model, data, --params
        where = "--params: " if params is not None and "param_filter" in str(exc) else ""
        raise CLIError(f"{where}cannot build the {TITLES[matrix]} operator: {exc}") from exc


def _eig_rows(results) -> list[dict]:
    return [
        {
            "backend": r.backend,
            "eigenvalues": r.eigenvalues.tolist(),  # ascending, as eigsh and scipy
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
    """Eigenvalues ascending, as eigsh returns them; beyond 5, the 5 largest (the end a
    Hessian's top eigenvalues are read from)."""
    shown = min(k, 5)
    head = f"{'backend':<10}" + "".join(
        f"{'λ' + str(i + 1 + k - shown):>12}" for i in range(shown))
    head += f"{'max rel res':>13}{'conv':>6}{'matvecs':>9}{'time s':>9}"
    rep.say(head)
    for r in rows:
        vals = "".join(f"{v:>12.6g}" for v in r["eigenvalues"][k - shown:])
        rep.say(f"{r['backend']:<10}{vals}{r['max_relative_residual']:>13.1e}"
                f"{r['converged']:>4}/{k}{r['num_matvecs']:>9}{r['seconds']:>9.3f}")


def _spectrum(rep: Reporter, op, *, k: int, which: str, backends: list[str], tol: float,
              png: Path | None, label: str, trace_matvecs: int, seed: int,
              model_name: str | None = None, slq: tuple[int, int] = (8, 60)) -> list:
    import torchcurv

    results = []
    for backend in backends:
        with rep.step(f"{label}: {k} {WHICH_WORDS[which]} eigenpairs ({which}) via {backend}"):
            # names typed by the user: eigsh checks them and says which exist
            results.append(torchcurv.eigsh(op, k=k, which=cast("Which", which),
                                           backend=cast("EigshBackend", backend), tol=tol,
                                           seed=seed))
    rows = _eig_rows(results)
    rep.record.setdefault("matrices", {})[label] = {"n": op.n, "eigsh": rows}
    rep.say(f"\n{label} ({op.n} x {op.n}): the {k} {WHICH_WORDS[which]} eigenvalues "
            f"(which={which}), ascending, tol {tol:g}")
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
            density = torchcurv.spectral_density(op, num_probes=slq[0],
                                                 lanczos_steps=min(slq[1], op.n), seed=seed)
            density.plot(png, title=f"{TITLES.get(label.lower(), label)} spectral density",
                         eigenvalues=results[0].eigenvalues, model=model_name,
                         eigenvalue_label=f"eigenvalues found by eigsh ({backends[0]})")
        rep.say(f"spectral density picture: {png.resolve()}")
        rep.record["matrices"][label]["spectral_density_png"] = str(png.resolve())
        # the solves already ran: the convergence picture costs no product
        conv = png.with_name(f"{png.stem}-convergence{png.suffix}")
        torchcurv.plot_convergence(
            results, conv, title=f"{TITLES.get(label.lower(), label)}: eigsh convergence")
        rep.say(f"convergence picture: {conv.resolve()}")
        rep.record["matrices"][label]["convergence_png"] = str(conv.resolve())
    return results


def _landscape(rep: Reporter, op, results: list, png: Path, label: str) -> None:
    """``--landscape``: the loss along the eigenvector of the largest |eigenvalue| found,
    with its quadratic model, over ``t = ±2/sqrt(|λ|)`` (where that model changes by 2)."""
    import torchcurv

    first = results[0]
    top = int(first.eigenvalues.abs().argmax())
    lam = float(first.eigenvalues[top])
    a = 2 / abs(lam) ** 0.5 if lam != 0 else 1.0
    with rep.step(f"{label}: loss landscape along the top eigenvector"):
        scape = torchcurv.loss_landscape(op.model, op.objective, op.data,
                                         first.eigenvectors[:, top], curvature=op,
                                         span=(-a, a), steps=21)
        scape.plot(png, title=f"loss along the {label} eigenvector of λ = {lam:.4g}")
    gap = float((scape.losses - scape.quadratic).abs().max())
    rep.say(f"loss landscape along λ = {lam:.6g} (t in ±{a:.3g}): picture {png.resolve()}; "
            f"largest gap to the quadratic model {gap:.3g}")
    rep.record["matrices"][label]["landscape"] = {
        "png": str(png.resolve()), "eigenvalue": lam, "span": [-a, a],
        "t": scape.coordinates.tolist(), "losses": scape.losses.tolist(),
        "quadratic": scape.quadratic.tolist(), "loss0": scape.loss0,
    }


def _default_backends(device: torch.device) -> list[str]:
    backends = ["arpack", "lanczos", "block"]
    if device.type == "cuda":
        try:
            import cupy  # noqa: F401

            backends.append("cupy")
        except ImportError:
            pass
    return backends


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6,
          "gb": 10**9}


def _max_memory(text: str) -> int | str | None:
    """``--max-memory``: ``auto``, ``none`` or a size such as ``40GiB`` / ``512MB`` /
    ``1e9`` (bytes), as the operators' ``max_memory=`` takes it."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    number = word.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = word[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise CLIError(
            f"--max-memory takes auto, none or a size such as 40GiB, 512MB or 1e9 (bytes), "
            f"got {text!r}") from None
    if not value >= 1:
        raise CLIError(f"--max-memory must be at least one byte, got {text!r}")
    return int(value)


def _check_device(name: str) -> torch.device:
    """``--device`` as a torch device that exists here, before any work."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)"
                       ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: this torch {torch.__version__} sees no CUDA GPU "
                       "(torch.cuda.is_available() is False); use --device cpu")
    return device


def _check_backends(backends: list[str], which: str) -> None:
    """Each backend named exists here and serves ``which`` (before a model is built)."""
    from torchcurv.algorithms.eigsh import backend_function, check_backend_serves

    for backend in backends:
        try:
            backend_function(backend)
            check_backend_serves(backend, which)
        except ValueError as exc:
            raise CLIError(f"{exc} (--backend/--backends, --which)") from exc


def _check_plan(op, *, k: int, which: str, backends: list[str], tol: float,
                trace_matvecs: int | None) -> int:
    """Every solve's arguments checked against the operator before the first solve (so a
    bad ``--k`` does not end a long run halfway); returns the trace budget to use:
    ``--trace-matvecs``, or by default ``min(60, 3 n)`` (Hutch++ spends a third of it on a
    sketch of at most ``n`` vectors)."""
    from torchcurv.algorithms.arguments import check_k, check_tol

    try:
        check_k(k, op.n)
    except ValueError as exc:
        raise CLIError(f"--k {k}: {exc}; give --k at most {op.n - 1}") from exc
    _check_backends(backends, which)
    try:
        check_tol(tol, op.dtype)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--tol: {exc}") from exc
    if trace_matvecs is None:
        return min(60, 3 * op.n)
    if not 3 <= trace_matvecs <= 3 * op.n:
        raise CLIError(f"--trace-matvecs {trace_matvecs}: Hutch++ needs 3 to 3 n = "
                       f"{3 * op.n} products for this n = {op.n} operator")
    return trace_matvecs


def _can_draw(rep: Reporter, paths: list[str | None], skip: bool) -> bool:
    """Whether matplotlib is there for the pictures asked for. Without it: ``skip`` (the
    demo's default picture) prints a one-line note and goes on, else an error before any
    work."""
    if all(p is None for p in paths):
        return True
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        pass
    else:
        return True
    if skip:
        rep.note("no picture: it needs matplotlib: pip install 'torchcurv[plot]'")
        return False
    raise CLIError("the pictures (--png, --landscape) need matplotlib: "
                   "pip install 'torchcurv[plot]'")


def run_demo(args: argparse.Namespace) -> int:
    from torchcurv.demo import demo_problem

    rep = Reporter(args.quiet, args.json)
    device = _check_device(args.device)
    backends = args.backends.split(",") if args.backends else _default_backends(device)
    _check_backends(backends, "LA")
    png = Path(args.png) if args.png and _can_draw(rep, [args.png], skip=True) else None
    # --quick: the same network on a quarter of the data and shorter solves, so that the
    # tests of the command line run in seconds on a busy CPU
    samples, batch = (256, 128) if args.quick else (1024, 256)
    slq = (4, 30) if args.quick else (8, 60)
    t0 = time.perf_counter()
    with rep.step("building the demo model (20-32-32-5 MLP on synthetic data)"):
        model, criterion, data = demo_problem(device=str(device), num_samples=samples,
                                              batch_size=batch)
    nparams = sum(p.numel() for p in model.parameters())
    rep.say("torchcurv demo: a small MLP (20-32-32-5, tanh) briefly trained on a synthetic "
            f"5-class problem,\n{samples} samples in {len(data)} batches, float64, "
            f"{nparams} parameters, device {device}")
    import torchcurv

    for label, cls in (("Hessian", torchcurv.HessianOperator),
                       ("GGN", getattr(torchcurv, "GGNOperator", None))):
        if cls is None:
            continue
        op = cls(model, criterion, data)
        trace_matvecs = _check_plan(op, k=args.k, which="LA", backends=backends, tol=args.tol,
                                    trace_matvecs=args.trace_matvecs)
        out = None if png is None else png.with_name(f"{png.stem}-{label.lower()}{png.suffix}")
        _spectrum(rep, op, k=args.k, which="LA", backends=backends, tol=args.tol, png=out,
                  label=label, trace_matvecs=trace_matvecs, seed=args.seed, slq=slq,
                  model_name=f"demo MLP 20-32-32-5, {samples} samples")
    rep.record["seconds"] = time.perf_counter() - t0
    rep.say(f"\ndone in {rep.record['seconds']:.1f} s")
    if args.json:
        print(json.dumps(rep.record, indent=2))
    return 0


def _load_module_problem(spec: str, rep: Reporter):
    """``(model, criterion, data)`` from ``package.module:function``, the module imported
    as ``python -m`` would: the current directory first on ``sys.path`` (a console script
    starts with its own ``bin/`` there instead)."""
    if ":" not in spec:
        raise CLIError(f"--module takes 'package.module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {mod_name!r} (from {os.getcwd()} or sys.path): {exc}"
                       ) from exc
    rep.note(f"--module: {mod_name} imported from {getattr(module, '__file__', None)}")
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise CLIError(f"{mod_name!r} has no function {fn_name!r}")
    try:
        problem = fn()
    except Exception as exc:
        raise CLIError(f"{spec}() raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(problem, tuple) and len(problem) == 3):
        raise CLIError(f"{spec} must return (model, criterion, data), got {type(problem)}")
    model, criterion, data = problem
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec} must return (model, criterion, data) with model an "
                       f"nn.Module, got {type(model).__name__}")
    if not callable(criterion):
        raise CLIError(f"{spec} must return (model, criterion, data) with criterion a loss "
                       f"module such as nn.CrossEntropyLoss(), got {type(criterion).__name__}")
    if hasattr(data, "__len__") and len(data) == 0:
        raise CLIError(f"{spec} returned empty data: give a list (or loader) of (input, "
                       "target) batches")
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
    # transformers' stubs type the wrapper around PreTrainedModel.to as taking a model
    model = model.to(device).eval()  # type: ignore[arg-type]
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (2, seq_len), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    return model, causal_lm_objective(), data


def run_spectrum(args: argparse.Namespace) -> int:
    rep = Reporter(args.quiet, args.json is not None)
    device = _check_device(args.device)
    if (args.hf is None) == (args.module is None):
        raise CLIError("give exactly one of --hf PATH or --module package.module:function")
    _can_draw(rep, [args.png, args.landscape], skip=False)
    if args.hf is not None:
        model, criterion, data = _load_hf_problem(args.hf, device, args.seq_len, args.batches)
        name = f"{type(model).__name__} ({Path(args.hf).name})"
    else:
        model, criterion, data = _load_module_problem(args.module, rep)
        model = model.to(device)
        name = args.module
    op = _operator(args.matrix, model, criterion, data, args.params,
                   max_memory=_max_memory(args.max_memory), compile=args.compile,
                   cuda_graphs=args.cuda_graphs)
    backends = args.backend.split(",")
    trace_matvecs = _check_plan(op, k=args.k, which=args.which, backends=backends,
                                tol=args.tol, trace_matvecs=args.trace_matvecs)
    if args.plan:
        _memory_plan(rep, op, k=args.k, backends=backends)
        if args.json is not None:
            Path(args.json).write_text(json.dumps(rep.record, indent=2))
        return 0
    png = Path(args.png) if args.png else None
    results = _spectrum(rep, op, k=args.k, which=args.which, backends=backends,
              tol=args.tol, png=png, label=args.matrix, trace_matvecs=trace_matvecs,
              seed=args.seed, model_name=name)
    if args.landscape is not None:
        _landscape(rep, op, results, Path(args.landscape), args.matrix)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(rep.record, indent=2))
        rep.say(f"results: {Path(args.json).resolve()}")
    return 0


def _memory_plan(rep: Reporter, op, *, k: int, backends: list[str]) -> None:
    """Print what one product and each solver's Krylov basis will take, before running
    them: the product's peak measured on 1, 2 and 4 vectors (``op.memory_estimate``), the
    basis as ``ncv x n`` in the operator's dtype, and whether both fit the device."""
    from torchcurv.algorithms.block import default_block_size
    from torchcurv.algorithms.lanczos import default_ncv
    from torchcurv.operators.memory import basis_bytes, format_bytes
    with rep.step("measuring products of 1, 2 and 4 vectors"):
        one = op.memory_estimate(1)
    rep.say(f"memory plan for the {op.n:,} x {op.n:,} operator ({op.dtype}, {op.device}):")
    rep.say(f"  one product, 1 vector: {format_bytes(one.bytes)} at its peak; each further "
            f"vector of a block adds {format_bytes(one.per_vector_bytes)} ({one.method})")
    free = None
    if op.device.type == "cuda":
        free = torch.cuda.mem_get_info(op.device)[0]
        rep.say(f"  free on {op.device}: {format_bytes(free)}")
    plans = []
    for backend in backends:
        p = default_block_size(op.n, k) if backend == "block" else 1
        ncv = default_ncv(op.n, k, p)
        basis = basis_bytes(op.n, ncv, op.dtype)
        peak = one.at(p).bytes
        where = "on the device" if free is None or basis + peak <= free else \
            "in host memory (basis_device='cpu'): it does not fit beside the product"
        rep.say(f"  {backend}: blocks of {p}, product peak {format_bytes(peak)}; basis "
                f"{ncv} x {op.n:,} = {format_bytes(basis)}, {where}")
        plans.append({"backend": backend, "block_size": p, "ncv": ncv,
                      "product_peak_bytes": peak, "basis_bytes": basis, "basis": where})
    rep.record["memory_plan"] = {
        "n": op.n, "dtype": str(op.dtype), "device": str(op.device),
        "one_vector_bytes": one.bytes, "fixed_bytes": one.fixed_bytes,
        "per_vector_bytes": one.per_vector_bytes, "measured": one.measured,
        "method": one.method, "free_bytes": free, "solvers": plans}


def build_parser() -> argparse.ArgumentParser:
    from torchcurv.algorithms.arguments import WHICH
    from torchcurv.algorithms.eigsh import BACKENDS

    ap = argparse.ArgumentParser(prog="torchcurv", description="Curvature spectra of PyTorch "
                                 "models through SciPy, CuPy and torch solvers.")
    sub = ap.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    backend_list = "eigsh backends (which they serve):\n" + "\n".join(
        f"  {name:<8} {b.summary} ({', '.join(b.which or ())})" for name, b in BACKENDS.items())
    output = ("Results go to stdout (a table, or JSON with --json); progress goes to stderr: "
              "a bar on a terminal, else a line per step and every "
              f"{HEARTBEAT_S:.0f} s. Eigenvalues are listed ascending, as eigsh returns them.")
    class Formatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
        """Defaults shown, epilog line breaks kept."""

    def common(p):
        p.add_argument("--k", type=int, default=5,
                       help="number of eigenpairs, 1 <= k < n (n: parameters differentiated)")
        p.add_argument("--tol", type=float, default=1e-6,
                       help="relative residual asked for, ||A v - λ v|| <= tol |λ|")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the solvers' start vectors and the trace/SLQ probes")
        p.add_argument("--trace-matvecs", type=int, default=None,
                       help="operator products for the Hutch++ trace, 3 to 3 n "
                       "(default: min(60, 3 n))")
        p.add_argument("--device", default=default_device,
                       help="torch device of the model and the solves (cpu, cuda, cuda:1)")
        p.add_argument("--quiet", action="store_true", help="print nothing but errors")

    demo = sub.add_parser("demo", help="the built-in demo: no downloads, seconds on a CPU",
                          formatter_class=Formatter, epilog=f"{backend_list}\n\n{output}",
                          description="Hessian and GGN of a small trained MLP: top eigenvalues "
                          "by several backends side by side, the Hutch++ trace and a "
                          "spectral-density picture.")
    common(demo)
    demo.add_argument("--backends", default=None,
                      help="comma-separated eigsh backends (default: arpack,lanczos,block"
                      "[,cupy on a GPU with CuPy])")
    demo.add_argument("--png", default="torchcurv-demo.png",
                      help="spectral-density picture path (one per matrix, suffixed "
                      "-hessian/-ggn); needs matplotlib (torchcurv[plot]), skipped with a "
                      "note without it")
    demo.add_argument("--json", action="store_true", help="print one JSON document")
    demo.add_argument("--quick", action="store_true",
                      help="a quarter of the data and shorter SLQ: a smoke test in seconds")
    demo.set_defaults(run=run_demo)

    module_shape = (
        "--module package.module:function (imported as python -m would, the current "
        "directory first) must return (model, criterion, data): model an nn.Module, "
        "criterion a loss module such as nn.CrossEntropyLoss() (mean reduction), data a "
        "non-empty list or loader of (input, target) batches.")
    spec = sub.add_parser("spectrum", help="the spectrum of your own model",
                          formatter_class=Formatter,
                          epilog=f"{module_shape}\n\n{backend_list}\n\n{output}")
    common(spec)
    spec.add_argument("--hf", default=None, help="local HuggingFace config/checkpoint dir")
    spec.add_argument("--module", default=None, help="package.module:function returning "
                      "(model, criterion, data); see below")
    spec.add_argument("--matrix", choices=MATRICES, default="hessian",
                      help="hessian, ggn (generalized Gauss-Newton), ef (empirical Fisher), "
                      "fisher (Monte-Carlo Fisher)")
    spec.add_argument("--which", default="LA", choices=WHICH,
                      help="LA/SA largest/smallest algebraic, LM/SM largest/smallest "
                      "magnitude, BE both ends")
    spec.add_argument("--backend", default="lanczos",
                      help=f"eigsh backend(s), comma-separated: {', '.join(BACKENDS)}")
    spec.add_argument("--params", default=None, help='glob on parameter names, e.g. "h.*.attn.*"')
    spec.add_argument("--seq-len", type=int, default=64, help="--hf: tokens per sequence")
    spec.add_argument("--batches", type=int, default=2, help="--hf: random-token batches")
    spec.add_argument("--json", default=None, help="write the results as JSON to this path")
    spec.add_argument("--png", default=None, help="write the spectral density picture here")
    spec.add_argument("--max-memory", default="auto", metavar="SIZE",
                      help="most memory one product may take (e.g. 40GiB): blocks are split "
                      "to fit; auto: 85%% of the free GPU memory; none: never split")
    spec.add_argument("--compile", action="store_true",
                      help="torch.compile the products (forward-over-reverse, finite "
                      "differences, the GGN's forward JVP; the first product compiles)")
    spec.add_argument("--cuda-graphs", action="store_true",
                      help="record each batch's product as a CUDA graph and replay it "
                      "(launch-bound models on a GPU)")
    spec.add_argument("--plan", action="store_true",
                      help="print the memory plan (one product's peak, each solver's basis) "
                      "and stop, before any solve")
    spec.add_argument("--landscape", default=None, metavar="PNG",
                      help="draw the loss along the top eigenvector, with the quadratic model, "
                      "to this picture")
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
