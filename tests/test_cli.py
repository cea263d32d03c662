"""``torchcurv`` command line: the demo and ``spectrum`` on a user's own model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torchcurv.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--k", "3", "--trace-matvecs", "24", "--device", "cpu"]


def problem():
    """``(model, criterion, data)`` for ``--module test_cli:problem``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 4, dtype=torch.float64, generator=g),
             torch.randint(0, 3, (b,), generator=g)) for b in (5, 3)]
    return model, nn.CrossEntropyLoss(), data


def not_a_problem():
    return "model"


def test_demo_prints_agreeing_backends_trace_and_writes_both_pictures(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", *FAST, "--backends", "arpack,lanczos", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    for line in ("Hessian (1893 x 1893)", "GGN (1893 x 1893)", "arpack", "lanczos",
                 "trace (Hutch++", "spectral density picture"):
        assert line in out
    disagreements = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                     if line.startswith("largest relative disagreement")]
    assert len(disagreements) == 2 and max(disagreements) < 1e-8
    for name in ("demo-hessian.png", "demo-ggn.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_json_is_one_document_with_eigenvalues_and_trace(tmp_path, capsys):
    assert main(["demo", *FAST, "--backends", "arpack,block", "--json",
                 "--png", str(tmp_path / "d.png")]) == 0
    record = json.loads(capsys.readouterr().out)
    hessian = record["matrices"]["Hessian"]
    assert hessian["n"] == 1893
    arpack, block = hessian["eigsh"]
    assert arpack["backend"] == "arpack" and block["backend"] == "block"
    assert len(arpack["eigenvalues"]) == 3
    assert arpack["eigenvalues"] == sorted(arpack["eigenvalues"], reverse=True)
    assert arpack["eigenvalues"] == pytest.approx(block["eigenvalues"], rel=1e-6)
    # the trace of the Hessian exceeds the sum of its top three eigenvalues here
    assert hessian["trace"]["estimate"] > sum(arpack["eigenvalues"])
    assert hessian["trace"]["std_error"] > 0


def test_quiet_demo_prints_nothing(tmp_path, capsys):
    assert main(["demo", *FAST, "--backends", "lanczos", "--quiet",
                 "--png", str(tmp_path / "d.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_unknown_backend_is_a_clear_error_with_exit_status_2(capsys):
    assert main(["demo", *FAST, "--backends", "arpak"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchcurv: error:") and "arpak" in err and "arpack" in err


def test_spectrum_of_a_module_function_writes_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "spectrum.json"
    code = main(["spectrum", "--module", "test_cli:problem", "--matrix", "ggn", "--k", "2",
                 "--backend", "arpack,lanczos", "--params", "0.*", "--json", str(out),
                 "--device", "cpu", "--quiet"])
    assert code == 0
    record = json.loads(out.read_text())["matrices"]["ggn"]
    assert record["n"] == 4 * 6 + 6  # the first layer only
    model, criterion, data = problem()
    G = __import__("torchcurv").GGNOperator(model, criterion, data, param_filter="0.*")
    expected = torch.linalg.eigvalsh(G.to_dense()).flip(0)[:2].tolist()
    for row in record["eigsh"]:
        assert row["eigenvalues"] == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize(("args", "message"), [
    (["--module", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--module", "test_cli"], "package.module:function"),
    (["--module", "test_cli:missing"], "has no function 'missing'"),
    (["--module", "test_cli:not_a_problem"], "must return (model, criterion, data)"),
    ([], "exactly one of --hf PATH or --module"),
    (["--hf", "/nonexistent/dir"], "--hf"),
])
def test_spectrum_input_errors_name_the_problem(args, message, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["spectrum", *args, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_spectrum_of_a_config_only_hf_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16)
    cfg.save_pretrained(tmp_path)
    out = tmp_path / "r.json"
    code = main(["spectrum", "--hf", str(tmp_path), "--matrix", "ggn", "--k", "2",
                 "--params", "transformer.h.0.attn.*", "--seq-len", "6", "--device", "cpu",
                 "--backend", "lanczos", "--json", str(out), "--quiet"])
    assert code == 0
    row = json.loads(out.read_text())["matrices"]["ggn"]["eigsh"][0]
    assert row["converged"] == 2 and row["eigenvalues"][0] > 0


def test_console_entry_point_runs_as_a_module():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torchcurv", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0
    assert "demo" in done.stdout and "spectrum" in done.stdout
