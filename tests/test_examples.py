"""Every script in examples/ runs to the end and prints its conclusion.

The examples check their own numbers (they exit non-zero when backends, oracles or
solvers disagree), so a zero exit plus the final line is the specification.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "eigsh_mlp.py": ([], "scipy and torchcurv agree"),
    "compare_backends.py": ([], "every backend that ran converged and agrees"),
    "validate_against_curvlinops.py": (["curvlinops"], "torchcurv matches plain autograd"),
    "scipy_pipeline.py": ([], "expm_multiply agrees with the dense matrix exponential"),
    "influence_and_newton_cg.py": ([], "influence and Newton-CG agree with the dense answers"),
}


def test_listed_examples_exist():
    assert set(EXAMPLES) <= {p.name for p in (ROOT / "examples").glob("*.py")}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script):
    needs, last_line = EXAMPLES[script]
    for module in needs:
        pytest.importorskip(module)
    # Tiny models: threads only add synchronisation (and oversubscribe parallel test runs).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert last_line in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize(("script", "extra"), [
    ("validate_against_curvlinops.py", "curvlinops"),
    ("hf_tiny_gpt2_ggn.py", "transformers"),
    ("transformer_lens_attention.py", "transformer_lens"),
])
def test_example_without_its_extra_names_the_safe_install_line(script, extra):
    # the extra made unimportable as if not installed: the error is one line telling how
    # to install it without replacing the CPU torch (constraints.txt), not a traceback
    code = (f"import runpy, sys; sys.modules[{extra!r}] = None; "
            f"runpy.run_path({str(ROOT / 'examples' / script)!r}, run_name='__main__')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "-c constraints.txt" in proc.stderr and "pip install" in proc.stderr
    if extra == "curvlinops":
        assert "--no-deps curvlinops-for-pytorch==3.0.1" in proc.stderr
