"""Cross-validation table: torchcurv and curvlinops against explicit autograd matrices.

Runs every case of ``tests/crossval/cases.py`` (operator x model x loss x reduction x
parameter subset, float64, 4 random probes) and prints a Markdown table of the largest
relative error per operator and model, with what curvlinops raised where it raised.

    python benchmarks/crossval_table.py                 # summary table (about a minute on CPU)
    python benchmarks/crossval_table.py --full          # one row per case
    python benchmarks/crossval_table.py > docs/validation_table.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "crossval"))

from cases import KINDS, MODELS, all_cases, run_case

NAMES = {"hessian": "Hessian", "ggn": "GGN", "ef": "empirical Fisher",
         "mc_fisher": "MC Fisher (2 samples, same seed)"}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="one row per case")
    args = ap.parse_args()
    rows = [(c, run_case(*c)) for c in all_cases()]
    print(f"torch {torch.__version__}, float64 CPU; relative error "
          "‖A v - R v‖ / ‖R v‖ over 4 probes; oracle R = explicit autograd matrix "
          "(see tests/crossval/cases.py)\n")
    if args.full:
        print("| operator | model | loss | reduction | params | torchcurv vs oracle | "
              "curvlinops vs oracle | torchcurv vs curvlinops |")
        print("|---|---|---|---|---|---|---|---|")
        for (kind, model, loss, red, subset), o in rows:
            cl = o.curvlinops_error or _fmt(o.curvlinops_vs_oracle)
            print(f"| {NAMES[kind]} | {model} | {loss} | {red} | {subset} | "
                  f"{_fmt(o.torchcurv_vs_oracle)} | {cl} | {_fmt(o.torchcurv_vs_curvlinops)} |")
        return
    worst: dict = defaultdict(lambda: [0.0, 0.0, 0.0, set(), 0])
    for (kind, model, *_rest), o in rows:
        w = worst[(kind, model)]
        w[0] = max(w[0], o.torchcurv_vs_oracle)
        w[4] += 1
        if o.curvlinops_error:
            w[3].add(o.curvlinops_error.split(":")[0] + ": " +
                     o.curvlinops_error.split(":", 1)[1].strip()[:60])
        else:
            w[1] = max(w[1], o.curvlinops_vs_oracle)
            w[2] = max(w[2], o.torchcurv_vs_curvlinops)
    print("| operator | model | cases | torchcurv vs oracle (max) | curvlinops vs oracle (max) "
          "| torchcurv vs curvlinops (max) | curvlinops raised |")
    print("|---|---|---|---|---|---|---|")
    for kind in KINDS:
        for model in MODELS:
            t, c, tc, errs, n = worst[(kind, model)]
            print(f"| {NAMES[kind]} | {model} | {n} | {_fmt(t)} | {_fmt(c)} | {_fmt(tc)} | "
                  f"{'; '.join(sorted(errs)) or '—'} |")


if __name__ == "__main__":
    main()
