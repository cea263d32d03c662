"""Resumable solves: eigsh(..., checkpoint=PATH) for the torch Lanczos backends.

An interrupted and resumed solve is the uninterrupted solve (bit-identical on the CPU in
float64), paid with only the products the interruption had not yet spent."""

import pytest
import torch
from spectra import rotated

import torchcurv
from torchcurv import MatrixOperator
from torchcurv.algorithms import checkpoint as checkpoint_module

DT = torch.float64
N = 300
# small bases on a spectrum with close top eigenvalues: dozens of thick restarts
OPTIONS = {"lanczos": {"ncv": 12}, "block": {"ncv": 16, "block_size": 2}}
K, TOL = 4, 1e-10


@pytest.fixture(scope="module")
def A():  # noqa: N802 (the matrix, as in the other solver tests)
    return rotated(torch.linspace(0, 1, N, dtype=DT))


def solve(A, backend, **extra):
    op = MatrixOperator(A)
    kwargs = {"k": K, "which": "LA", "tol": TOL, "seed": 0, **OPTIONS[backend], **extra}
    return op, torchcurv.eigsh(op, backend=backend, **kwargs)


def interrupt_after(restarts):
    def callback(info):
        if info["restart"] == restarts:
            raise KeyboardInterrupt
    return callback


@pytest.fixture(scope="module")
def uninterrupted(A):
    return {backend: solve(A, backend)[1] for backend in OPTIONS}


@pytest.mark.parametrize("backend", list(OPTIONS))
@pytest.mark.parametrize("stop", [2, 20])
def test_a_resumed_solve_is_the_uninterrupted_one_for_fewer_products(
        A, uninterrupted, tmp_path, backend, stop):
    full = uninterrupted[backend]
    assert full.info.restarts > 20 and full.all_converged
    path = tmp_path / "solve.ckpt"
    with pytest.raises(KeyboardInterrupt):
        solve(A, backend, checkpoint=path, callback=interrupt_after(stop))
    saved = torch.load(path, weights_only=True)
    state = saved["state"]
    assert state["restarts"] == stop and 0 < state["num_matvecs"] < full.num_matvecs
    assert saved["arguments"]["k"] == K and saved["arguments"]["backend"] == backend
    # only the rows a restart keeps (kept Ritz vectors + the residual block) are saved
    assert state["basis"].shape == (1, state["kept"] + OPTIONS[backend].get("block_size", 1), N)

    op, resumed = solve(A, backend, checkpoint=path)
    assert torch.equal(resumed.eigenvalues, full.eigenvalues)
    assert torch.equal(resumed.eigenvectors, full.eigenvectors)
    assert torch.equal(resumed.residuals, full.residuals)
    assert resumed.num_matvecs == full.num_matvecs
    assert op.num_matvecs == full.num_matvecs - state["num_matvecs"] < full.num_matvecs
    assert resumed.info.resumed_matvecs == state["num_matvecs"]
    assert resumed.info.restarts == full.info.restarts
    assert resumed.info.history == full.info.history
    assert not path.exists(), "a finished solve deletes its checkpoint"
    assert list(tmp_path.iterdir()) == []


def test_a_checkpointed_solve_that_is_not_interrupted_changes_nothing(A, uninterrupted,
                                                                      tmp_path):
    path = tmp_path / "solve.ckpt"
    _, r = solve(A, "lanczos", checkpoint=str(path))
    full = uninterrupted["lanczos"]
    assert torch.equal(r.eigenvalues, full.eigenvalues) and r.num_matvecs == full.num_matvecs
    assert r.info.resumed_matvecs is None and not path.exists()


@pytest.mark.parametrize(("change", "named"), [
    ({"k": K + 1}, "k: saved 4, asked 5"),
    ({"tol": 1e-9}, "tol"),
    ({"which": "SA"}, "which"),
    ({"seed": 1}, "start vector"),
    ({"ncv": 14}, "ncv"),
])
def test_a_checkpoint_of_another_solve_is_refused_before_any_product(A, tmp_path, change,
                                                                     named):
    path = tmp_path / "solve.ckpt"
    with pytest.raises(KeyboardInterrupt):
        solve(A, "lanczos", checkpoint=path, callback=interrupt_after(2))
    before = path.read_bytes()
    op = MatrixOperator(A)
    kwargs = {"k": K, "which": "LA", "tol": TOL, "seed": 0, **OPTIONS["lanczos"], **change}
    with pytest.raises(ValueError, match="belongs to another solve") as err:
        torchcurv.eigsh(op, backend="lanczos", checkpoint=path, **kwargs)
    assert named in str(err.value) and str(path) in str(err.value)
    assert op.num_matvecs == 0 and path.read_bytes() == before


def test_a_lanczos_checkpoint_is_not_resumed_by_block(A, tmp_path):
    path = tmp_path / "solve.ckpt"
    with pytest.raises(KeyboardInterrupt):
        solve(A, "lanczos", checkpoint=path, callback=interrupt_after(2))
    with pytest.raises(ValueError, match="backend: saved 'lanczos', asked 'block'"):
        solve(A, "block", checkpoint=path, ncv=12)


@pytest.mark.parametrize("backend", ["arpack", "lobpcg", "power"])
def test_other_backends_refuse_checkpoint_naming_those_that_take_it(A, tmp_path, backend):
    with pytest.raises(ValueError, match="lanczos, block") as err:
        torchcurv.eigsh(MatrixOperator(A), k=2, which="LM" if backend == "power" else "LA",
                        backend=backend, checkpoint=tmp_path / "x.ckpt")
    assert repr(backend) in str(err.value)
    with pytest.raises(ValueError, match="without sigma"):
        torchcurv.eigsh(MatrixOperator(A), k=2, sigma=0.5, backend="lanczos",
                        checkpoint=tmp_path / "x.ckpt")


def test_bad_paths_and_foreign_files_get_clear_errors(A, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        solve(A, "lanczos", checkpoint=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        solve(A, "lanczos", checkpoint=tmp_path / "missing" / "x.ckpt")
    with pytest.raises(TypeError, match="must be a path"):
        solve(A, "lanczos", checkpoint=3)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        solve(A, "lanczos", checkpoint=junk)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a torchcurv Lanczos checkpoint"):
        solve(A, "lanczos", checkpoint=other)


def test_an_interrupted_write_leaves_the_previous_checkpoint_intact(A, uninterrupted,
                                                                    tmp_path, monkeypatch):
    path = tmp_path / "solve.ckpt"
    real_save, writes = torch.save, []

    def torn_save(obj, f):
        writes.append(1)
        if len(writes) == 3:  # the third restart's write dies halfway
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        solve(A, "lanczos", checkpoint=path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["solve.ckpt"], "no temporary file left"
    assert torch.load(path, weights_only=True)["state"]["restarts"] == 2
    _, resumed = solve(A, "lanczos", checkpoint=path)
    assert torch.equal(resumed.eigenvalues, uninterrupted["lanczos"].eigenvalues)


def test_maxiter_may_grow_on_resume_and_counts_all_restarts(A, uninterrupted, tmp_path):
    path = tmp_path / "solve.ckpt"
    full = uninterrupted["lanczos"]
    with pytest.raises(KeyboardInterrupt):
        solve(A, "lanczos", checkpoint=path, callback=interrupt_after(5))
    _, short = solve(A, "lanczos", checkpoint=path, maxiter=8)
    assert short.info.stop_reason == "maxiter" and short.info.restarts == 8
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt):
        solve(A, "lanczos", checkpoint=path, callback=interrupt_after(5))
    _, r = solve(A, "lanczos", checkpoint=path, maxiter=10 * N)
    assert torch.equal(r.eigenvalues, full.eigenvalues)


def test_a_float32_host_basis_resumes_bit_identically_too(A, tmp_path):
    path = tmp_path / "solve.ckpt"
    low = {"basis_dtype": torch.float32, "basis_device": "cpu"}
    _, full = solve(A, "lanczos", **low)
    with pytest.raises(KeyboardInterrupt):
        solve(A, "lanczos", checkpoint=path, callback=interrupt_after(3), **low)
    assert torch.load(path, weights_only=True)["state"]["basis"].dtype == torch.float32
    with pytest.raises(ValueError, match="basis_dtype"):
        solve(A, "lanczos", checkpoint=path)
    _, resumed = solve(A, "lanczos", checkpoint=path, **low)
    assert torch.equal(resumed.eigenvalues, full.eigenvalues)
    assert resumed.num_matvecs == full.num_matvecs
