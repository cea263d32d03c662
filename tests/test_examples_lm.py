"""The language-model examples run to completion on the CPU and print what they promise."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, env: dict | None = None, check: bool = True):
    """The script's stdout (``check``: after asserting a zero exit), else the process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env,
                          capture_output=True, text=True, timeout=240)
    if not check:
        return done
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


def _llama_example():
    pytest.importorskip("transformers")
    return runpy.run_path(str(ROOT / "examples" / "llama_top10.py"), run_name="llama_top10")


def _llama_oracles():
    """Dense float64 Hessian and GGN of the example's tiny model, by plain autograd
    (``tests/hf_zoo.py``) on the model's own loss, largest eigenvalues first."""
    from hf_zoo import ggn_of, hessian_of

    from torchcurv.models.language import next_token_targets

    example = _llama_example()
    model, data = example["build"]("tiny", torch.device("cpu"), torch.float64)
    batch = data[0]
    names = [name for name, _ in model.named_parameters()]
    H = hessian_of(model, names, lambda call: call(**batch).loss)
    targets = next_token_targets(batch["labels"])
    G = ggn_of(model, names,
               lambda call: call(input_ids=batch["input_ids"]).logits.reshape(targets.numel(), -1),
               lambda rows: torch.nn.functional.cross_entropy(rows, targets))
    return {name: torch.linalg.eigvalsh(A).flip(0)[:10] for name, A in
            (("hessian", H), ("ggn", G))}


def test_llama_top10_tiny_finds_the_dense_top10(tmp_path):
    oracle = _llama_oracles()
    out = tmp_path / "top10.json"
    stdout = _run("llama_top10.py", "--tiny", "--json", str(out))
    assert "every eigenpair converged" in stdout
    found = json.loads(out.read_text())
    for matrix in ("ggn", "hessian"):
        got = torch.tensor(found[matrix]["eigenvalues"], dtype=torch.float64)
        # LLaMA's RMSNorm runs in float32 even in a float64 model: ~1e-7 agreement
        assert float((got - oracle[matrix]).abs().max() / oracle[matrix][0]) < 1e-6, matrix
        assert all(found[matrix]["converged"])
        assert max(found[matrix]["relative_residuals"]) <= found[matrix]["tol"]


def test_llama_top10_without_cuda_names_tiny():
    pytest.importorskip("transformers")
    done = _run("llama_top10.py", env={"CUDA_VISIBLE_DEVICES": ""}, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "needs a CUDA GPU" in done.stderr and "--tiny" in done.stderr
