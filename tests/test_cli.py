"""``torchcurv`` command line: the demo and ``spectrum`` on a user's own model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from torchcurv.cli import main

ROOT = Path(__file__).resolve().parents[1]
# --quick: the demo's network (n = 1893) on a quarter of its data, seconds on a busy CPU;
# the full demo is what `tox -e demo` runs
FAST = ["--quick", "--k", "3", "--trace-matvecs", "24", "--device", "cpu"]


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


def raising():
    raise RuntimeError("no data on this machine")


def string_model():
    return "model", nn.CrossEntropyLoss(), problem()[2]


def empty_data():
    return problem()[0], nn.CrossEntropyLoss(), []


def test_demo_prints_agreeing_backends_trace_and_writes_both_pictures(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", *FAST, "--backends", "arpack,lanczos", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    for line in ("Hessian (1893 x 1893)", "GGN (1893 x 1893)", "arpack", "lanczos",
                 "trace (Hutch++", "spectral density picture", "convergence picture"):
        assert line in out
    disagreements = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                     if line.startswith("largest relative disagreement")]
    assert len(disagreements) == 2 and max(disagreements) < 1e-8
    for name in ("demo-hessian.png", "demo-ggn.png", "demo-hessian-convergence.png",
                 "demo-ggn-convergence.png"):
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
    assert arpack["eigenvalues"] == sorted(arpack["eigenvalues"])  # ascending, as eigsh
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
    expected = torch.linalg.eigvalsh(G.to_dense())[-2:].tolist()
    for row in record["eigsh"]:
        assert row["eigenvalues"] == pytest.approx(expected, rel=1e-8)


def test_spectrum_plan_prints_product_peak_and_basis_and_runs_no_solve(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "plan.json"
    assert main(["spectrum", "--module", "test_cli:problem", "--k", "3", "--plan",
                 "--backend", "lanczos,block", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "memory plan for the 51 x 51 operator" in text
    assert "lanczos: blocks of 1" in text and "basis 20 x 51" in text
    assert "eigenvalues" not in text  # nothing solved
    assert main(["spectrum", "--module", "test_cli:problem", "--k", "3", "--plan",
                 "--json", str(out), "--device", "cpu", "--quiet"]) == 0
    plan = json.loads(out.read_text())["memory_plan"]
    assert plan["n"] == 51 and plan["solvers"][0]["basis_bytes"] == 20 * 51 * 8
    assert [size for size, _ in plan["measured"]] == [1, 2, 4]
    assert plan["solvers"][0]["product_peak_bytes"] == plan["one_vector_bytes"] > 0


def test_spectrum_with_a_memory_budget_gives_the_same_eigenvalues(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    runs = {}
    for budget in ("none", "2KiB"):
        out = tmp_path / f"{budget}.json"
        assert main(["spectrum", "--module", "test_cli:problem", "--k", "3", "--backend",
                     "block", "--max-memory", budget, "--json", str(out), "--device", "cpu",
                     "--quiet"]) == 0
        runs[budget] = json.loads(out.read_text())["matrices"]["hessian"]["eigsh"][0]
    assert runs["2KiB"]["eigenvalues"] == pytest.approx(runs["none"]["eigenvalues"], rel=1e-10)


@pytest.mark.parametrize(("args", "message"), [
    (["--module", "test_cli:problem", "--max-memory", "lots"], "--max-memory takes auto"),
    (["--module", "test_cli:problem", "--max-memory", "0.1"], "at least one byte"),
    (["--module", "test_cli:problem", "--cuda-graphs"], "records CUDA graphs"),
    (["--module", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--module", "test_cli"], "package.module:function"),
    (["--module", "test_cli:missing"], "has no function 'missing'"),
    (["--module", "test_cli:not_a_problem"], "must return (model, criterion, data)"),
    (["--module", "test_cli:raising"], "test_cli:raising() raised RuntimeError: no data"),
    (["--module", "test_cli:string_model"], "model an nn.Module, got str"),
    (["--module", "test_cli:empty_data"], "returned empty data"),
    (["--module", "test_cli:problem", "--params", "zzz"], "--params: cannot build"),
    (["--module", "test_cli:problem", "--k", "51"], "give --k at most 50"),
    (["--module", "test_cli:problem", "--trace-matvecs", "500"], "3 to 3 n = 153"),
    (["--module", "test_cli:problem", "--which", "SM", "--backend", "lanczos"],
     "backends for 'SM': arpack"),
    (["--module", "test_cli:problem", "--backend", "arpak"], "unknown eigsh backend 'arpak'"),
    (["--module", "test_cli:problem", "--device", "nonsense"], "is not a torch device"),
    ([], "exactly one of --hf PATH or --module"),
    (["--hf", "/nonexistent/dir"], "--hf"),
])
def test_spectrum_input_errors_name_the_problem(args, message, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    device = [] if "--device" in args else ["--device", "cpu"]
    assert main(["spectrum", *args, *device]) == 2
    err = capsys.readouterr().err.splitlines()
    # one error line, last, and no step (eigsh, trace, SLQ) started before it
    assert [line for line in err if "error" in line] == err[-1:]
    assert err[-1].startswith("torchcurv: error:") and message in err[-1]
    assert not any(line.endswith(" ...") for line in err)


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


def _console(args, cwd, timeout=300):
    """The installed console script (not ``python -m``), as a new user runs it."""
    script = Path(sys.executable).with_name("torchcurv")
    if not script.exists():
        pytest.skip("no torchcurv console script next to this interpreter")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def test_console_script_imports_a_module_of_the_current_directory_and_says_which(tmp_path):
    (tmp_path / "myprob.py").write_text(
        "from torch import nn\nimport torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()\n"
        "    x = torch.randn(6, 3, dtype=torch.float64)\n"
        "    return m, nn.CrossEntropyLoss(), [(x, torch.tensor([0, 1, 0, 1, 1, 0]))]\n")
    done = _console(["spectrum", "--module", "myprob:build", "--k", "2", "--device", "cpu",
                     "--backend", "arpack", "--which", "SA"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"myprob imported from {tmp_path / 'myprob.py'}" in done.stderr
    assert "the 2 smallest eigenvalues (which=SA), ascending" in done.stdout
    # n = 14 is too small for Hutch++ with 60 products (a 20-vector sketch): the default
    # budget is 3 n = 42 here, not an error after the eigensolve
    assert "trace (Hutch++, 42 matvecs)" in done.stdout
    # progress went to stderr although it is not a terminal: a start and an end line
    assert "via arpack ..." in done.stderr and "trace by Hutch++:" in done.stderr


def test_help_shows_defaults_backends_and_what_build_must_return(tmp_path):
    done = _console(["spectrum", "--help"], tmp_path, timeout=120)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for needle in ("(default: lanczos)", "(default: 0)", "--seed", "--trace-matvecs",
                   "min(60, 3 n)", "--device", "must return (model, criterion, data)",
                   "nn.Module", "arpack", "lobpcg", "cupy", "block", "power",
                   "Eigenvalues are listed ascending"):
        assert needle in text, needle


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for a torch without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error_before_any_work(capsys):
    assert main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sees no CUDA GPU" in err and "--device cpu" in err


def test_demo_json_without_matplotlib_still_prints_the_json(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *FAST, "--backends", "lanczos", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["matrices"]["GGN"]["n"] == 1893
    assert "pip install 'torchcurv[plot]'" in captured.err
    assert not list(tmp_path.glob("*.png"))


def test_explicit_picture_without_matplotlib_is_an_error_before_any_work(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["spectrum", "--module", "test_cli:problem", "--png", "x.png",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchcurv: error:") and "torchcurv[plot]" in err


def test_progress_lines_every_heartbeat_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    from torchcurv import cli

    monkeypatch.setattr(cli, "HEARTBEAT_S", 0.05)
    rep = cli.Reporter(quiet=False, as_json=True)
    with rep.step("solving"):
        __import__("time").sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "solving ..." and err[-1].startswith("solving: ")
    assert any(line.startswith("solving ... ") and line.endswith(" s") for line in err[1:-1])


def test_density_picture_marks_the_eigenvalues_and_states_what_it_shows(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from torchcurv.algorithms.spectral import SpectralDensity

    seen = {}
    plot = SpectralDensity.plot

    def keep(self, path_or_ax=None, **kw):
        ax = plot(self, None, **kw)  # the Axes of the same drawing
        seen[kw["title"]] = ax
        return plot(self, path_or_ax, **kw)

    monkeypatch.setattr(SpectralDensity, "plot", keep)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "r.json"
    assert main(["spectrum", "--module", "test_cli:problem", "--matrix", "ggn", "--k", "2",
                 "--backend", "arpack", "--png", str(tmp_path / "g.png"), "--json", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    ax = seen["GGN spectral density"]
    found = json.loads(out.read_text())["matrices"]["ggn"]["eigsh"][0]["eigenvalues"]
    marks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert marks == pytest.approx(found)
    title = ax.get_title()
    assert "test_cli:problem" in title and "n = 51" in title
    assert "8 probes x 51 steps" in title and "sigma =" in title
    curve = ax.get_lines()[0].get_ydata()
    # below 1e-8 of the peak the curve is left out, not drawn along the axis floor
    assert np.isnan(curve).any() and np.nanmin(curve) >= 1e-8 * np.nanmax(curve)
