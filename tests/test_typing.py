"""torchcurv type-checks: mypy (configured in pyproject.toml) finds no error in the package.

Runs mypy in a subprocess with its cache in ``.mypy_cache`` at the repository root, so
that only the first run checks torch's stubs (about a minute) and later ones take
seconds.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error_in_torchcurv():
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(ROOT / ".mypy_cache"),
         "--no-error-summary", "--show-error-codes"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
