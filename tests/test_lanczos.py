"""Thick-restart Lanczos: exact against eigvalsh on known spectra, honest about the rest."""

import pytest
import torch
from spectra import rotated
from zoo import case, explicit_hessian

import torchcurv
from torchcurv.algorithms import krylov
from torchcurv.algorithms.lanczos import lanczos_eigsh
from torchcurv.algorithms.result import residual_norms

DT = torch.float64


def wanted(eigenvalues: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """What scipy's eigsh returns for ``which``, ascending."""
    ev = torch.sort(eigenvalues).values
    if which == "LA":
        chosen = ev[-k:]
    elif which == "SA":
        chosen = ev[:k]
    elif which == "LM":
        chosen = ev[torch.argsort(ev.abs(), descending=True)[:k]]
    else:
        chosen = torch.cat([ev[: k // 2], ev[len(ev) - (k - k // 2):]])
    return torch.sort(chosen).values


def indefinite_spectrum(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=DT, generator=g) * 3


def assert_true_eigenpairs(A: torch.Tensor, result, tol: float) -> None:
    V, lam = result.eigenvectors, result.eigenvalues
    R = (A @ V - V * lam).norm(dim=0)
    assert bool((R <= tol * lam.abs()).all()), R / lam.abs()
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1], dtype=DT), atol=1e-8)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigenvalues_match_eigvalsh_for_every_which(which):
    ev = indefinite_spectrum(200)
    A = rotated(ev)
    r = lanczos_eigsh(torchcurv.MatrixOperator(A), k=7, which=which, tol=1e-9, seed=0)
    assert r.all_converged and r.info.stop_reason == "converged"
    assert torch.allclose(r.eigenvalues, wanted(ev, 7, which), rtol=1e-9, atol=0)
    assert bool((r.eigenvalues[1:] >= r.eigenvalues[:-1]).all()), "ascending like scipy"
    assert_true_eigenpairs(A, r, 1e-9)
    assert r.backend == "lanczos" and r.which == which


def test_large_diagonal_operator_needs_few_products():
    n = 2000
    ev = torch.linspace(0, 1, n, dtype=DT) ** 2
    ev[-5:] = torch.tensor([2.0, 2.5, 3.0, 3.5, 4.0], dtype=DT)
    op = torchcurv.MatrixOperator(torch.diag(ev))
    r = lanczos_eigsh(op, k=5, tol=1e-8)
    assert torch.allclose(r.eigenvalues, ev[-5:], rtol=1e-10)
    assert r.num_matvecs < 200
    assert r.info.ncv == 20 and r.info.basis_bytes == 20 * n * 8


def test_tiny_gaps_in_a_cluster_are_resolved_without_ghosts():
    # Top eigenvalues 10, 10 - 1e-6, 10 - 2e-6, ...: a tight cluster above a bulk.
    n = 300
    ev = torch.linspace(0, 5, n, dtype=DT)
    ev[-6:] = 10 - 1e-6 * torch.arange(5, -1, -1, dtype=DT)
    A = rotated(ev)
    r = lanczos_eigsh(torchcurv.MatrixOperator(A), k=6, tol=1e-12, seed=3)
    assert r.all_converged
    assert torch.allclose(r.eigenvalues, ev[-6:], rtol=1e-12, atol=0)
    assert_true_eigenpairs(A, r, 1e-12)


def test_clustered_hessian_like_spectrum_has_no_spurious_copies():
    # The hessian-eigenthings failure: near-copies of the top eigenvalue. Converged pairs
    # must be the true eigenvalues, each once, with orthonormal vectors.
    n = 400
    g = torch.Generator().manual_seed(5)
    bulk = torch.rand(n - 12, dtype=DT, generator=g) * 0.02
    top = 0.2 + 0.005 * torch.rand(12, dtype=DT, generator=g)
    ev = torch.cat([bulk, top])
    A = rotated(ev)
    r = lanczos_eigsh(torchcurv.MatrixOperator(A), k=10, tol=1e-6, seed=0)
    assert r.all_converged
    assert torch.allclose(r.eigenvalues, wanted(ev, 10, "LA"), rtol=1e-10, atol=0)
    assert_true_eigenpairs(A, r, 1e-6)


def test_repeated_eigenvalue_every_returned_pair_is_a_true_eigenpair():
    # Single-vector Lanczos may miss copies of a repeated eigenvalue (documented); what it
    # returns must still be eigenpairs, each eigenvalue no more often than its multiplicity.
    n = 200
    ev = torch.linspace(0, 1, n, dtype=DT)
    ev[-3:] = 5.0
    ev[-4] = 4.0
    A = rotated(ev)
    r = lanczos_eigsh(torchcurv.MatrixOperator(A), k=4, tol=1e-10, seed=0)
    assert r.all_converged
    assert_true_eigenpairs(A, r, 1e-10)
    for value in r.eigenvalues.unique():
        found = int((r.eigenvalues - value).abs().lt(1e-8).sum())
        assert found <= int((ev - value).abs().lt(1e-8).sum())
        assert bool((ev - value).abs().min() < 1e-8)


def test_invariant_subspace_breakdown_continues_and_finds_all_copies():
    # Three distinct eigenvalues: the Krylov space of any start vector is invariant after
    # three steps. The search must go on with fresh directions, not stop or stall.
    ev = torch.cat([torch.full((40,), v, dtype=DT) for v in (1.0, 2.0, 3.0)])
    op = torchcurv.MatrixOperator(rotated(ev))
    r = lanczos_eigsh(op, k=4, which="LA", tol=1e-10, seed=0)
    assert r.all_converged
    assert torch.allclose(r.eigenvalues, torch.full((4,), 3.0, dtype=DT),
                          rtol=1e-10)


def test_hessian_of_zoo_model_matches_explicit_hessian():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    expected = torch.linalg.eigvalsh(explicit_hessian(model, criterion, data))
    for which in ("LA", "SA"):
        r = lanczos_eigsh(H, k=3, which=which, tol=1e-8, seed=0)
        assert r.all_converged
        assert torch.allclose(r.eigenvalues, wanted(expected, 3, which), rtol=1e-7, atol=0)


def test_same_seed_same_result_and_v0_overrides_seed():
    op = torchcurv.MatrixOperator(rotated(indefinite_spectrum(150)))
    a = lanczos_eigsh(op, k=4, tol=1e-8, seed=7)
    b = lanczos_eigsh(op, k=4, tol=1e-8, seed=7)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.num_matvecs == b.num_matvecs
    v0 = torch.ones(op.n, dtype=DT)
    c = lanczos_eigsh(op, k=4, tol=1e-8, seed=1, v0=v0)
    d = lanczos_eigsh(op, k=4, tol=1e-8, seed=2, v0=v0)
    assert torch.equal(c.eigenvectors, d.eigenvectors)
    assert torch.allclose(a.eigenvalues, c.eigenvalues, rtol=1e-8)


def test_float32_basis_for_float64_operator_reaches_float32_accuracy():
    ev = indefinite_spectrum(300)
    A = rotated(ev)
    r = lanczos_eigsh(torchcurv.MatrixOperator(A), k=5, tol=1e-5, seed=0,
                      basis_dtype=torch.float32)
    assert r.info.basis_dtype == torch.float32
    assert r.info.basis_bytes == r.info.ncv * 300 * 4
    assert r.eigenvectors.dtype == DT
    assert r.all_converged
    assert torch.allclose(r.eigenvalues, wanted(ev, 5, "LA"), rtol=1e-6, atol=0)


def test_streamed_basis_in_small_pieces_gives_the_same_eigenpairs(monkeypatch):
    # A host-resident or other-dtype basis is streamed to the operator's device in column
    # pieces; force pieces a few coordinates wide (the n ~ 1e9 regime, where one row is
    # gigabytes) and compare.
    ev = indefinite_spectrum(120)
    op = torchcurv.MatrixOperator(rotated(ev))
    whole = lanczos_eigsh(op, k=3, tol=1e-5, seed=0, basis_dtype=torch.float32)
    widths = []
    pieces = krylov.KrylovBasis.column_pieces

    def spy(self, count, always=False):
        for columns, Q in pieces(self, count, always):
            widths.append(columns.stop - columns.start)
            yield columns, Q
    monkeypatch.setattr(krylov, "CHUNK_BYTES", 20 * 8 * 7)
    monkeypatch.setattr(krylov.KrylovBasis, "column_pieces", spy)
    chunked = lanczos_eigsh(op, k=3, tol=1e-5, seed=0, basis_dtype=torch.float32)
    assert min(widths) <= 7  # a full basis of 20 rows: 7 coordinates a piece
    assert chunked.all_converged
    assert torch.allclose(chunked.eigenvalues, whole.eigenvalues, rtol=1e-6)
    assert torch.allclose(chunked.eigenvectors.abs(), whole.eigenvectors.abs(), atol=1e-5)


def test_gram_schmidt_over_column_pieces_is_classical_gram_schmidt_twice(monkeypatch):
    # The three sweeps over pieces give the same W as CGS2 on whole rows, for a streamed
    # basis cut into uneven pieces and for one that is not streamed.
    op = torchcurv.MatrixOperator(rotated(indefinite_spectrum(50)))
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(50, 6, dtype=DT, generator=g))[0].T[None]
    W = torch.randn(1, 2, 50, dtype=DT, generator=g) + 1e3 * Q[:, :2]
    want = W.clone()
    for _ in range(2):
        want = want - (want @ Q.transpose(1, 2)) @ Q
    monkeypatch.setattr(krylov, "CHUNK_BYTES", 6 * 8 * 7)  # 7-wide pieces: 50 = 7 * 7 + 1
    for basis_dtype in (torch.float64, torch.float32):
        kb = krylov.KrylovBasis(op, 1, 8, basis_dtype=basis_dtype,
                                generator=torch.Generator().manual_seed(0))
        kb.set_rows(0, Q)
        stored = kb.rows(0, 6)
        expected = want if basis_dtype == torch.float64 else W.clone()
        if basis_dtype != torch.float64:
            for _ in range(2):
                expected = expected - (expected @ stored.transpose(1, 2)) @ stored
        got = kb.orthogonalize(W.clone(), 6)
        assert torch.allclose(got, expected, rtol=0, atol=1e-10), basis_dtype
        assert float((got @ stored.transpose(1, 2)).abs().max()) < 1e-10


@pytest.mark.parametrize("op_dtype, basis_dtype", [(torch.bfloat16, None),
                                                    (torch.float32, torch.bfloat16)])
def test_bfloat16_operator_finds_large_eigenvalues_above_a_bulk_it_cannot_resolve(
        op_dtype, basis_dtype):
    # also a float32 operator with a bfloat16 basis (host-resident bases at LM scale):
    # the working precision, and so the noise floor, is then bfloat16's
    # A few eigenvalues far above a bulk that bfloat16 products cannot resolve (their
    # rounding, eps ||A|| ~ 8, exceeds the bulk): the recurrence must keep the genuine
    # directions. A breakdown test of 100 eps ||A|| (78 % of ||A||) discarded most of
    # them and returned 899 for 1000 and 13.7 for 200.
    top = torch.tensor([1000.0, 700.0, 500.0, 300.0, 200.0], dtype=DT)
    ev = torch.cat([top, torch.rand(395, dtype=DT, generator=torch.Generator().manual_seed(0))])
    A = rotated(ev)
    r = lanczos_eigsh(torchcurv.MatrixOperator(A.to(op_dtype)), k=5, tol=1e-2, seed=0,
                      maxiter=50, basis_dtype=basis_dtype)
    noise = 3 * torch.finfo(torch.bfloat16).eps * 1000
    assert torch.allclose(r.eigenvalues, top.flip(0), rtol=0, atol=noise), r.eigenvalues
    # what is within reach of bfloat16 is reported converged, with true residuals
    assert r.converged[-3:].all(), r.residuals / r.eigenvalues.abs()


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("n, segment", [(64, 8), (67, 8), (67, 33), (8, 4), (20, 64)])
def test_inner_products_in_pieces_equal_the_plain_product(lead, n, segment):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(*lead, 2, n, dtype=DT, generator=g)
    B = torch.randn(*lead, 5, n, dtype=DT, generator=g)
    expected = A @ B.transpose(-1, -2)
    got = krylov.inner_products(A, B, segment)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-13, atol=1e-12)
    # column-major views, as the power method and Hutch++ pass their (n, k) blocks
    At, Bt = A.transpose(-1, -2).contiguous(), B.transpose(-1, -2).contiguous()
    got = krylov.inner_products(At.transpose(-1, -2), Bt.transpose(-1, -2), segment)
    assert torch.allclose(got, expected, rtol=1e-13, atol=1e-12)


def test_projections_in_pieces_give_the_same_eigenpairs(monkeypatch):
    # CUDA cuts every long contraction into pieces; force that on the CPU for every
    # projection of the recurrence (Gram-Schmidt, T's diagonal, breakdown replacements).
    ev = torch.cat([indefinite_spectrum(100), torch.zeros(20, dtype=DT)])
    op = torchcurv.MatrixOperator(rotated(ev))
    whole = lanczos_eigsh(op, k=4, tol=1e-9, seed=0, which="BE")
    calls = []
    plain = krylov.inner_products
    monkeypatch.setattr(krylov, "inner_products",
                        lambda A, B: calls.append(A.shape[-1]) or plain(A, B, segment=7))
    pieces = lanczos_eigsh(op, k=4, tol=1e-9, seed=0, which="BE")
    assert calls and set(calls) == {120}
    assert pieces.all_converged
    assert torch.allclose(pieces.eigenvalues, whole.eigenvalues, rtol=1e-10)
    assert torch.allclose(pieces.eigenvalues, wanted(ev, 4, "BE"), rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inner_products_on_cuda_cut_long_contractions_and_stay_exact(dtype):
    n = 3 * krylov.SEGMENT + 5
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(1, 2, n, dtype=DT, generator=g), torch.randn(1, 7, n, dtype=DT,
                                                                    generator=g)
    got = krylov.inner_products(A.to("cuda", dtype), B.to("cuda", dtype))
    expected = A @ B.transpose(1, 2)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(got.double().cpu(), expected, rtol=tol, atol=tol * n ** 0.5)


@pytest.mark.gpu
def test_host_basis_for_gpu_operator():
    ev = indefinite_spectrum(500)
    op = torchcurv.MatrixOperator(rotated(ev).cuda())
    r = lanczos_eigsh(op, k=5, tol=1e-9, seed=0, basis_device="cpu")
    assert r.info.basis_device == torch.device("cpu")
    assert r.eigenvectors.device.type == "cuda"
    assert torch.allclose(r.eigenvalues, wanted(ev, 5, "LA"), rtol=1e-9, atol=0)
    on_gpu = lanczos_eigsh(op, k=5, tol=1e-9, seed=0)
    assert torch.allclose(r.eigenvalues, on_gpu.eigenvalues, rtol=1e-10)


def test_maxiter_stops_and_reports_unconverged_pairs():
    ev = torch.linspace(1, 1.001, 500, dtype=DT)  # no gaps to speak of
    r = lanczos_eigsh(torchcurv.MatrixOperator(torch.diag(ev)), k=5, tol=1e-12, maxiter=1)
    assert r.info.stop_reason == "maxiter" and r.info.restarts == 1
    assert not r.all_converged
    assert r.eigenvectors.shape == (500, 5)


def test_callback_sees_every_restart_cycle():
    seen = []
    op = torchcurv.MatrixOperator(rotated(indefinite_spectrum(200)))
    r = lanczos_eigsh(op, k=5, tol=1e-10, callback=seen.append)
    assert [d["restart"] for d in seen] == list(range(r.info.restarts + 1))
    assert seen[-1]["num_converged"] == 5
    assert seen[-1]["num_matvecs"] == r.num_matvecs
    assert seen[0]["ritz_values"].shape == (5,)


def test_values_only_and_full_space():
    ev = indefinite_spectrum(8)
    op = torchcurv.MatrixOperator(rotated(ev))
    r = lanczos_eigsh(op, k=7, which="SA", tol=1e-10, return_eigenvectors=False)
    full = lanczos_eigsh(op, k=7, which="SA", tol=1e-10)
    # the true residuals of the check, formed one Ritz vector at a time
    assert r.eigenvectors is None
    assert torch.allclose(r.residuals, full.residuals, rtol=0, atol=1e-12)
    assert torch.allclose(r.residuals, residual_norms(op, full.eigenvalues, full.eigenvectors),
                          rtol=0, atol=1e-12)
    assert r.all_converged
    assert torch.allclose(r.eigenvalues, torch.sort(ev).values[:7], rtol=1e-10)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"k": 0}, ValueError, "1 <= k < n"),
    ({"k": 50}, ValueError, "1 <= k < n"),
    ({"k": 2.0}, TypeError, "k must be an int"),
    ({"which": "LR"}, ValueError, "which must be one of"),
    ({"ncv": 3}, ValueError, "ncv must be"),
    ({"ncv": 51}, ValueError, "ncv must be"),
    ({"tol": -1.0}, ValueError, "tol must be"),
    ({"maxiter": 0}, ValueError, "maxiter"),
    ({"v0": torch.ones(49, dtype=DT)}, ValueError, "v0 must have shape"),
    ({"basis_dtype": torch.int32}, TypeError, "basis_dtype"),
    ({"callback": 3}, TypeError, "callback"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    op = torchcurv.MatrixOperator(torch.eye(50, dtype=DT))
    args = {"k": 3, **kwargs}
    with pytest.raises(error, match=match):
        lanczos_eigsh(op, **args)


def test_tensor_instead_of_operator_is_refused():
    with pytest.raises(TypeError, match="MatrixOperator"):
        lanczos_eigsh(torch.eye(5), k=1)


def test_large_start_blocks_are_drawn_in_pieces_independent_of_the_core_count(monkeypatch):
    # Above 4 pieces the start is drawn piece by piece on all cores (one generator at
    # n ~ 1e9 takes tens of seconds); the result must depend on the seed alone.
    from torchcurv.algorithms import result

    monkeypatch.setattr(result, "DRAW_PIECE", 16)
    draws = []
    for cores in (1, 3):
        monkeypatch.setattr(result.os, "cpu_count", lambda cores=cores: cores)
        draws.append(result.start_block(50, 2, DT, torch.device("cpu"), seed=5))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(result.start_block(50, 2, DT, torch.device("cpu"), seed=6), draws[0])
    flat = draws[0].flatten()
    assert not torch.equal(flat[:16], flat[16:32])  # each piece its own stream
    assert abs(float(flat.mean())) < 0.5 and 0.5 < float(flat.std()) < 1.5


def test_residual_norms_in_column_groups_and_float64_pieces_match_the_explicit_ones(
        monkeypatch):
    # At n ~ 1e9 the residual check goes column group by group and sums norms in pieces
    # (a float64 copy of k columns, or all k products at once, did not fit on an H200).
    from torchcurv.algorithms import result

    A = rotated(indefinite_spectrum(40))
    op = torchcurv.MatrixOperator(A)
    V = torch.randn(40, 5, dtype=DT, generator=torch.Generator().manual_seed(2))
    lam = torch.linspace(-1, 1, 5, dtype=DT)
    want = torch.linalg.vector_norm(A @ V - V * lam, dim=0)
    calls = []
    matmat = op.matmat
    monkeypatch.setattr(op, "matmat", lambda X: calls.append(X.shape[1]) or matmat(X))
    monkeypatch.setattr(result, "RESIDUAL_GROUP_BYTES", 2 * 40 * 8)
    got = result.residual_norms(op, lam, V)
    assert calls == [2, 2, 1]
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    X = torch.randn(3, 37, dtype=torch.float32)
    assert torch.allclose(result.norms64(X, dim=1, piece_bytes=3 * 8 * 5),
                          torch.linalg.vector_norm(X.double(), dim=1), rtol=1e-12)
    assert torch.allclose(result.norms64(X.T, dim=0, piece_bytes=8),
                          torch.linalg.vector_norm(X.double(), dim=1), rtol=1e-12)


@pytest.mark.gpu
def test_a_host_basis_for_a_cuda_operator_is_pinned_and_gives_the_device_basis_answer():
    # Pinned, its pieces cross by DMA row by row; the eigenpairs must not depend on where
    # the basis lives.
    ev = indefinite_spectrum(300)
    op = torchcurv.MatrixOperator(rotated(ev).cuda())
    kb = krylov.KrylovBasis(op, 1, 8, basis_device="cpu", basis_dtype=torch.float32,
                            generator=torch.Generator().manual_seed(0))
    assert kb.basis.device.type == "cpu" and kb.basis.is_pinned()
    host = lanczos_eigsh(op, k=4, tol=1e-6, seed=0, basis_device="cpu",
                         basis_dtype=torch.float32)
    device = lanczos_eigsh(op, k=4, tol=1e-6, seed=0, basis_dtype=torch.float32)
    assert host.all_converged and device.all_converged
    assert torch.allclose(host.eigenvalues, device.eigenvalues, rtol=1e-9)
