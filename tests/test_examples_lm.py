"""The language-model examples run to completion on the CPU and print what they promise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_hf_tiny_gpt2_ggn_example():
    pytest.importorskip("transformers")
    out = _run("hf_tiny_gpt2_ggn.py")
    assert "attention n=" in out and "mlp       n=" in out
    assert out.count("mass 1.000") == 2  # the densities are normalised


def test_transformer_lens_attention_example():
    pytest.importorskip("transformer_lens")
    out = _run("transformer_lens_attention.py")
    words = out.splitlines()[0].replace(")", "").split()
    assert words[1] == words[-1]  # the objective's loss is the model's own
    assert "top 3 eigenvalues" in out
