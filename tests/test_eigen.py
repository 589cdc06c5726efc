"""Eigensolvers of the differentiable trace term: accuracy, errors and the choice."""

from __future__ import annotations

import logging

import mpmath
import numpy as np
import pytest
import scipy.linalg
import torch

from fdpipe import eigen
from fdpipe.eigen import EigenError, resolve_eigensolver, symmetric_eigen
from fdpipe.loss import FDLoss
from fdpipe.stats import GaussianStats


def _matrix(kind: str, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "wishart":
        x = rng.standard_normal((2 * d, d))
        return x.T @ x / (2 * d)
    if kind == "rank_deficient":
        x = rng.standard_normal((d // 3, d))
        return x.T @ x
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if kind == "power_law":  # condition number d^3
        values = np.arange(1, d + 1, dtype=np.float64) ** -3.0
    elif kind == "clustered":  # half the eigenvalues equal, half 1e-9 apart
        values = np.concatenate([np.ones(d // 2), 2.0 + 1e-9 * np.arange(d - d // 2)])
    else:
        raise ValueError(kind)
    matrix = (q * values) @ q.T
    return 0.5 * (matrix + matrix.T)


def _reference_apply(matrix: np.ndarray, rows: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and rows @ Q diag(scale(values)) Q^T from scipy's LAPACK driver."""
    values, q = scipy.linalg.eigh(matrix, driver="evd")
    return values, ((rows @ q) * scale(values)) @ q.T


def _scale(values):
    values = np.asarray(values)
    return 0.5 / np.sqrt(np.maximum(values, 1e-10 * values.max()))


@pytest.mark.parametrize("solver", ["torch", "tridiagonal"])
@pytest.mark.parametrize("kind", ["wishart", "rank_deficient", "power_law", "clustered"])
def test_solvers_match_scipy(solver, kind):
    d = 120
    matrix = _matrix(kind, d)
    rows = np.random.default_rng(1).standard_normal((9, d))
    values, expected = _reference_apply(matrix, rows, _scale)
    result = symmetric_eigen(torch.tensor(matrix), solver, "test matrix")
    top = abs(values).max()
    np.testing.assert_allclose(result.values.numpy(), values, rtol=0, atol=1e-13 * top)
    applied = result.apply(torch.tensor(rows), torch.tensor(_scale(result.values.numpy())))
    # The weights reach 1 / sqrt(floor) on the small eigenvalues, so the
    # comparison is relative to the largest entry of the exact result.
    tolerance = {"wishart": 1e-13, "clustered": 1e-13, "rank_deficient": 1e-11, "power_law": 1e-8}
    np.testing.assert_allclose(
        applied.numpy(), expected, rtol=0, atol=tolerance[kind] * abs(expected).max()
    )


@pytest.mark.parametrize("solver", ["torch", "tridiagonal"])
def test_solvers_against_mpmath(solver):
    # 50-digit reference at d = 16 with condition number 1e8: eigenvalues and
    # the application of M^{-1/2} / 2 to a few rows.
    d = 16
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    values = np.logspace(-8, 0, d)
    matrix = (q * values) @ q.T
    matrix = 0.5 * (matrix + matrix.T)
    rows = rng.standard_normal((3, d))
    mpmath.mp.dps = 50
    exact_values, exact_vectors = mpmath.eigsy(mpmath.matrix(matrix.tolist()))
    inv_root = mpmath.matrix(d, d)
    for k in range(d):
        inv_root[k, k] = 0.5 / mpmath.sqrt(exact_values[k])
    operator = exact_vectors * inv_root * exact_vectors.T
    expected = np.array((mpmath.matrix(rows.tolist()) * operator).tolist(), dtype=np.float64)
    result = symmetric_eigen(torch.tensor(matrix), solver, "test matrix")
    order = np.argsort([float(v) for v in exact_values])
    exact_sorted = np.array([float(exact_values[int(i)]) for i in order])
    # backward stable: eigenvalue errors below d * eps * |M|
    np.testing.assert_allclose(result.values.numpy(), exact_sorted, rtol=0, atol=d * 2.3e-16)
    applied = result.apply(torch.tensor(rows), 0.5 / result.values.sqrt()).numpy()
    # A perturbation of eps * |M| moves the smallest eigenvalue by up to its
    # own size times eps * condition number (2e-8); the tolerance allows that.
    np.testing.assert_allclose(applied, expected, rtol=0, atol=1e-7 * abs(expected).max())


@pytest.mark.parametrize("d", [1, 2, 3])
def test_tridiagonal_tiny_matrices(d):
    matrix = _matrix("wishart", d, seed=d)
    rows = np.random.default_rng(3).standard_normal((2, d))
    values, expected = _reference_apply(matrix, rows, _scale)
    result = symmetric_eigen(torch.tensor(matrix), "tridiagonal", "tiny")
    np.testing.assert_allclose(result.values.numpy(), values, rtol=1e-14)
    applied = result.apply(torch.tensor(rows), torch.tensor(_scale(values)))
    np.testing.assert_allclose(applied.numpy(), expected, rtol=1e-13)


def test_tridiagonal_nan_names_the_matrix():
    matrix = torch.tensor(_matrix("wishart", 6))
    matrix[2, 1] = matrix[1, 2] = float("nan")
    with pytest.raises(EigenError, match="population matrix contains NaN or Inf"):
        symmetric_eigen(matrix, "tridiagonal", "population matrix")


def test_tridiagonal_falls_back_when_mrrr_fails(monkeypatch, caplog):
    from scipy.linalg import lapack

    def failing(diagonal, off, *args, **kwargs):
        n = len(diagonal)
        return 0, np.zeros(n), np.zeros((n, n)), 1

    monkeypatch.setattr(lapack, "dstemr", failing)
    matrix = _matrix("power_law", 40)
    rows = np.random.default_rng(4).standard_normal((3, 40))
    values, expected = _reference_apply(matrix, rows, _scale)
    with caplog.at_level(logging.WARNING, logger="fdpipe.eigen"):
        result = symmetric_eigen(torch.tensor(matrix), "tridiagonal", "test matrix")
    assert "dstemr returned info 1" in caplog.text
    np.testing.assert_allclose(result.values.numpy(), values, rtol=0, atol=1e-14)
    applied = result.apply(torch.tensor(rows), torch.tensor(_scale(result.values.numpy())))
    np.testing.assert_allclose(applied.numpy(), expected, rtol=0, atol=1e-8 * abs(expected).max())


def test_resolve_eigensolver_rules(monkeypatch):
    assert resolve_eigensolver("torch", 4096, "cpu") == "torch"
    assert resolve_eigensolver("tridiagonal", 8, "cpu") == "tridiagonal"
    assert resolve_eigensolver("auto", eigen.AUTO_MIN_DIM - 1, "cpu") == "torch"
    assert resolve_eigensolver("auto", 4096, "cuda") == "torch"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        resolve_eigensolver("tridiagonal", 8, "cuda")
    with pytest.raises(ValueError, match="unknown eigensolver 'qr'"):
        resolve_eigensolver("qr", 8, "cpu")
    monkeypatch.setattr(eigen, "choose_eigensolver", lambda dim: f"timed-{dim}")
    assert resolve_eigensolver("auto", eigen.AUTO_MIN_DIM, "cpu") == f"timed-{eigen.AUTO_MIN_DIM}"


def test_choose_eigensolver_keeps_the_faster(monkeypatch, caplog):
    eigen.choose_eigensolver.cache_clear()
    clock = iter([0.0, 5.0, 10.0, 11.0])  # torch takes 5 s, tridiagonal 1 s
    monkeypatch.setattr(eigen.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="fdpipe.eigen"):
        assert eigen.choose_eigensolver(64) == "tridiagonal"
    assert "torch eigh 5.00 s, tridiagonal 1.00 s" in caplog.text
    eigen.choose_eigensolver.cache_clear()


def test_fdloss_checkpoint_keeps_eigensolver(monkeypatch):
    rng = np.random.default_rng(5)
    ref = GaussianStats.from_features(rng.standard_normal((40, 6)), space="demo")
    pool = torch.tensor(rng.standard_normal((20, 6)))
    x = torch.tensor(rng.standard_normal((4, 6)))
    monkeypatch.setattr("fdpipe.loss.resolve_eigensolver", lambda *args: "tridiagonal")
    first = FDLoss({"demo": ref}, method="ema", beta=0.5)
    first.fill({"demo": pool})
    first({"demo": x})
    assert first.solvers == {"demo": "tridiagonal"}

    def must_not_resolve(*args):
        raise AssertionError("the restored solver must be used")

    monkeypatch.setattr("fdpipe.loss.resolve_eigensolver", must_not_resolve)
    resumed = FDLoss({"demo": ref}, method="ema", beta=0.5)
    resumed.load_state_dict(first.state_dict())
    assert resumed.solvers == {"demo": "tridiagonal"}
    assert float(resumed({"demo": x})[0]) == float(first({"demo": x})[0])
    # An explicit choice wins over the one in the checkpoint.
    explicit = FDLoss({"demo": ref}, method="ema", beta=0.5, eigensolver="torch")
    explicit.load_state_dict(first.state_dict())
    assert explicit.solvers == {}


def test_fdloss_solvers_agree():
    rng = np.random.default_rng(6)
    d = 60
    ref = GaussianStats.from_features(
        rng.standard_normal((200, d)) @ rng.standard_normal((d, d)), space="demo"
    )
    pool = torch.tensor(rng.standard_normal((100, d)))
    results = {}
    for solver in ("torch", "tridiagonal"):
        loss = FDLoss({"demo": ref}, method="queue", queue_size=80, eigensolver=solver)
        loss.fill({"demo": pool})
        x = torch.tensor(np.random.default_rng(7).standard_normal((8, d)), requires_grad=True)
        value, _ = loss({"demo": x})
        (grad,) = torch.autograd.grad(value, x)
        results[solver] = (float(value.detach()), grad)
    assert results["torch"][0] == pytest.approx(results["tridiagonal"][0], rel=1e-13)
    torch.testing.assert_close(
        results["torch"][1], results["tridiagonal"][1], rtol=1e-10, atol=1e-12
    )


def test_symmetric_eigen_input_errors():
    nan = torch.tensor(_matrix("wishart", 5))
    nan[1, 1] = float("nan")
    with pytest.raises(EigenError, match="test matrix contains NaN or Inf"):
        symmetric_eigen(nan, "torch", "test matrix")
    with pytest.raises(EigenError, match=r"expected a square matrix, got shape \(3, 4\)"):
        symmetric_eigen(torch.zeros(3, 4, dtype=torch.float64), "tridiagonal", "test matrix")
    with pytest.raises(ValueError, match="resolve 'auto'"):
        symmetric_eigen(torch.eye(3, dtype=torch.float64), "auto", "test matrix")


@pytest.mark.parametrize("solver", ["torch", "tridiagonal"])
def test_symmetric_eigen_empty_and_grad_inputs(solver):
    empty = symmetric_eigen(torch.zeros(0, 0, dtype=torch.float64), solver, "empty")
    assert empty.values.numel() == 0
    matrix = torch.tensor(_matrix("wishart", 4), requires_grad=True)
    result = symmetric_eigen(matrix.clone(), solver, "with grad")
    np.testing.assert_allclose(
        result.values.numpy(), np.linalg.eigvalsh(matrix.detach().numpy()), rtol=1e-13
    )


def test_auto_solver_rechosen_off_cpu():
    rng = np.random.default_rng(8)
    ref = GaussianStats.from_features(rng.standard_normal((40, 6)), space="demo")
    loss = FDLoss({"demo": ref}, method="ema", beta=0.5)
    loss.solvers["demo"] = "tridiagonal"  # as restored from a CPU checkpoint
    assert loss._solver("demo", torch.empty(2, 6, device="meta")) == "torch"
    explicit = FDLoss({"demo": ref}, method="ema", beta=0.5, eigensolver="tridiagonal")
    explicit.solvers["demo"] = "tridiagonal"
    assert explicit._solver("demo", torch.empty(2, 6, device="meta")) == "tridiagonal"
