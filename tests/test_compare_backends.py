"""compare_backends: several backends on one operator, side by side."""

import math

import numpy as np
import pytest
import torch
from spectra import known_matrix

import torchcurv
from torchcurv import MatrixOperator


@pytest.fixture
def op():
    A, _ = known_matrix("indefinite", 48)
    return MatrixOperator(torch.tensor(A))


def test_rows_agree_with_the_first_backend_and_report_cost(op):
    table = torchcurv.compare_backends(op, k=3, which="SA", backends=["arpack", "lobpcg"],
                                       tol=1e-9)
    assert table.reference == "arpack"
    assert [r.backend for r in table.rows] == ["arpack", "lobpcg"]
    assert table["arpack"].eigenvalue_agreement == 0.0
    assert table["lobpcg"].eigenvalue_agreement < 1e-8
    for row in table.rows:
        assert row.error is None and row.result.all_converged
        assert row.max_relative_residual <= 1e-9
    d = table.as_dicts()[1]
    assert d["backend"] == "lobpcg" and d["converged"] == 3 and d["num_matvecs"] > 0
    np.testing.assert_allclose(d["eigenvalues"], table["arpack"].result.eigenvalues, rtol=1e-8)


def test_str_is_a_table_with_one_line_per_backend_and_the_eigenvalues(op):
    text = str(torchcurv.compare_backends(op, k=2, backends=["arpack", "lobpcg"]))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["backend", "conv"]
    assert lines[2].startswith("arpack") and "(reference)" in lines[2]
    assert lines[3].startswith("lobpcg") and "2/2" in lines[3]
    assert "eigenvalues (ascending):" in text


def test_a_backend_that_cannot_run_here_gets_a_row_with_its_reason(op):
    table = torchcurv.compare_backends(op, k=2, which="BE", backends=["lobpcg", "arpack"])
    assert table.reference == "arpack"  # the first backend that ran
    assert table["lobpcg"].result is None and "finds which in" in table["lobpcg"].error
    assert math.isnan(table["lobpcg"].eigenvalue_agreement)
    assert "lobpcg     did not run" in str(table)


def test_options_reach_only_their_backend(op):
    table = torchcurv.compare_backends(op, k=2, backends=["arpack", "lobpcg"],
                                       options={"lobpcg": {"block_size": 4}})
    assert table["lobpcg"].result.info.block_size == 4
    with pytest.raises(ValueError, match="not compared"):
        torchcurv.compare_backends(op, k=2, backends=["arpack"], options={"cupy": {}})


def test_arguments_no_backend_accepts_fail_before_anything_runs(op):
    with pytest.raises(ValueError, match="unknown eigsh backend"):
        torchcurv.compare_backends(op, backends=["arpack", "magic"])
    with pytest.raises(ValueError, match="1 <= k < n"):
        torchcurv.compare_backends(op, k=48)
    assert op.num_matvecs == 0


def test_runnable_backends_lists_only_what_runs_and_says_why_not_the_others(op):
    names, reasons = torchcurv.runnable_backends(op, which="SM")
    assert set(names) | set(reasons) == set(torchcurv.algorithms.eigsh.BACKENDS)
    assert not set(names) & set(reasons)
    assert "arpack" in names  # the one backend serving SM
    assert "finds which in" in reasons["lanczos"] and "'SM'" in reasons["lanczos"]
    if op.device.type == "cpu":
        cupy_reason = torchcurv.runnable_backends(op, which="LA")[1]["cupy"]
        assert "CUDA device" in cupy_reason and "cpu" in cupy_reason
    table = torchcurv.compare_backends(op, k=2, which="SM", backends=names, tol=1e-8)
    assert all(row.error is None for row in table.rows)
