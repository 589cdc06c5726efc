"""Differentiable FD and FD-loss: gradients, agreement with the float FD, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdpipe.frechet import StatisticsError, frechet_distance
from fdpipe.loss import FDLoss, ReferenceTensors, differentiable_fd, projected_fd
from fdpipe.stats import EMAStatistics, GaussianStats, QueueStatistics


def _reference(rng: np.random.Generator, d: int, rank: int | None = None) -> GaussianStats:
    n = rank + 1 if rank is not None else 4 * d
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.5 + 1.0
    return GaussianStats.from_features(x, space="demo")


def _loss(
    ref: GaussianStats,
    method: str,
    pool: torch.Tensor,
    full: bool = True,
    eigensolver: str = "auto",
) -> FDLoss:
    """FDLoss whose estimator keeps the full second moment (so tests can call population)."""
    loss = FDLoss({"demo": ref}, method=method, beta=0.7, queue_size=12, eigensolver=eigensolver)
    if full:
        root = loss.refs["demo"].sqrt_sigma
        if method == "ema":
            loss.estimators["demo"] = EMAStatistics(ref.dim, 0.7, projection=root)
        else:
            loss.estimators["demo"] = QueueStatistics(ref.dim, 12, projection=root)
    loss.fill({"demo": pool})
    return loss


def test_default_ema_matches_full_moment_ema():
    rng = np.random.default_rng(7)
    ref = _reference(rng, 9)
    pool = torch.tensor(rng.standard_normal((25, 9)))
    lean = _loss(ref, "ema", pool, full=False)
    full = _loss(ref, "ema", pool)
    assert lean.estimators["demo"].m2 is None
    for _ in range(3):
        x = torch.tensor(rng.standard_normal((4, 9)), requires_grad=True)
        lean_value, _ = lean({"demo": x})
        (lean_grad,) = torch.autograd.grad(lean_value, x)
        full_value, _ = full({"demo": x})
        (full_grad,) = torch.autograd.grad(full_value, x)
        assert float(lean_value.detach()) == pytest.approx(float(full_value.detach()), rel=1e-13)
        torch.testing.assert_close(lean_grad, full_grad, rtol=1e-12, atol=1e-14)
        lean.update({"demo": x.detach()})
        full.update({"demo": x.detach()})
    with pytest.raises(RuntimeError, match="keep_second_moment=True"):
        lean.estimators["demo"].population(x)


@pytest.mark.parametrize("method", ["ema", "queue"])
def test_loss_matches_float_fd(method):
    rng = np.random.default_rng(0)
    d = 8
    ref = _reference(rng, d)
    loss = _loss(ref, method, torch.tensor(rng.standard_normal((20, d))))
    for _ in range(3):
        x = torch.tensor(rng.standard_normal((4, d)))
        value, values = loss({"demo": x})
        mu, sigma = loss.estimators["demo"].population(x)
        expected = frechet_distance(
            mu1=mu.numpy(), sigma1=sigma.numpy(), mu2=ref.mu, sigma2=ref.sigma
        )
        assert float(value) == pytest.approx(expected, rel=1e-12)
        assert values["demo"] == pytest.approx(expected, rel=1e-12)
        full = differentiable_fd(mu, sigma, loss.refs["demo"])
        assert float(full) == pytest.approx(expected, rel=1e-12)
        loss.update({"demo": x})


@pytest.mark.parametrize("eigensolver", ["torch", "tridiagonal"])
@pytest.mark.parametrize("method", ["ema", "queue"])
@pytest.mark.parametrize("case", ["full_rank", "rank_deficient_reference", "subspace_population"])
def test_gradcheck_through_statistics(method, case, eigensolver):
    rng = np.random.default_rng(1)
    d = 6
    ref = _reference(rng, d, rank=3 if case == "rank_deficient_reference" else None)
    pool = rng.standard_normal((20, d))
    batch = rng.standard_normal((4, d))
    if case == "subspace_population":
        basis = rng.standard_normal((d, 3))
        pool = pool[:, :3] @ basis.T
        batch = batch[:, :3] @ basis.T
    loss = _loss(ref, method, torch.tensor(pool), eigensolver=eigensolver)
    x = torch.tensor(batch, requires_grad=True)

    population = loss.estimators["demo"].projected_population(x.detach())
    matrix = population.scale * population.second_moment
    matrix = matrix - torch.outer(population.centre, population.centre)
    smallest = torch.linalg.eigvalsh(matrix)[0].abs()
    if case != "full_rank":
        assert smallest < 1e-12

    # Out-of-subspace steps h raise the zero eigenvalues to about h^2, so the
    # trace term moves by |h|: central differences cancel that only while both
    # sides stay above the round-off threshold (about 1e-14 here), so the
    # subspace case uses h = 1e-4 instead of the default 1e-6.
    step = 1e-4 if case == "subspace_population" else 1e-6
    assert torch.autograd.gradcheck(lambda t: loss({"demo": t})[0], (x,), eps=step)
    mu_sigma = loss.estimators["demo"].population
    assert torch.autograd.gradcheck(
        lambda t: differentiable_fd(*mu_sigma(t), loss.refs["demo"]), (x,), eps=step
    )


@pytest.mark.parametrize("method", ["ema", "queue"])
def test_projected_and_full_gradients_agree(method):
    rng = np.random.default_rng(2)
    d = 10
    ref = _reference(rng, d)
    loss = _loss(ref, method, torch.tensor(rng.standard_normal((30, d))))
    x = torch.tensor(rng.standard_normal((5, d)), requires_grad=True)
    fast = projected_fd(loss.estimators["demo"].projected_population(x), loss.refs["demo"])
    (grad_fast,) = torch.autograd.grad(fast, x)
    full = differentiable_fd(*loss.estimators["demo"].population(x), loss.refs["demo"])
    (grad_full,) = torch.autograd.grad(full, x)
    torch.testing.assert_close(grad_fast, grad_full, rtol=1e-10, atol=1e-12)


def test_gradient_finite_at_zero_eigenvalues():
    # Population confined to a 2-d subspace of a 12-d space: 10 eigenvalues
    # of R S R are zero, and the capped derivative keeps the gradient finite.
    rng = np.random.default_rng(3)
    d = 12
    ref = _reference(rng, d)
    basis = rng.standard_normal((d, 2))
    loss = _loss(ref, "ema", torch.tensor(rng.standard_normal((20, 2)) @ basis.T))
    x = torch.tensor(rng.standard_normal((4, 2)) @ basis.T, requires_grad=True)
    value, _ = loss({"demo": x})
    value.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max() > 0


def test_multi_space_normalisation():
    rng = np.random.default_rng(4)
    refs = {"a": _reference(rng, 5), "b": _reference(rng, 7)}
    loss = FDLoss(refs, method="ema", beta=0.5, weights={"a": 2.0, "b": 0.5})
    loss.fill({"a": torch.randn(10, 5, dtype=torch.float64), "b": torch.randn(10, 7, dtype=torch.float64)})
    xa = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    total, values = loss({"a": xa, "b": xb})
    assert float(total.detach()) == pytest.approx(2.5, rel=1e-6)
    total.backward()
    fd_a = projected_fd(loss.estimators["a"].projected_population(xa), loss.refs["a"])
    (grad_a,) = torch.autograd.grad(fd_a, xa)
    torch.testing.assert_close(xa.grad, 2.0 * grad_a / (values["a"] + 1e-8))


@pytest.mark.parametrize("full", [True, False])
def test_fdloss_state_dict_round_trip(full):
    rng = np.random.default_rng(5)
    ref = _reference(rng, 6)
    loss = _loss(ref, "ema", torch.tensor(rng.standard_normal((12, 6))), full=full)
    loss.update({"demo": torch.tensor(rng.standard_normal((3, 6)))})
    copy = _loss(ref, "ema", torch.zeros(2, 6), full=full)
    copy.load_state_dict(loss.state_dict())
    x = torch.tensor(rng.standard_normal((3, 6)))
    assert float(copy({"demo": x})[0]) == float(loss({"demo": x})[0])


def test_nan_features_raise_with_space():
    rng = np.random.default_rng(6)
    loss = _loss(_reference(rng, 4), "ema", torch.tensor(rng.standard_normal((8, 4))))
    x = torch.zeros(2, 4, dtype=torch.float64)
    x[0, 1] = float("inf")
    with pytest.raises(StatisticsError, match="features contain NaN or Inf"):
        loss({"demo": x})


def test_zero_covariance_raises_instead_of_sentinel():
    ref = GaussianStats(np.zeros(3), np.zeros((3, 3)), 10)
    with pytest.raises(StatisticsError, match="space 'demo': .* no positive eigenvalue"):
        loss = FDLoss({"demo": ref}, method="ema", beta=0.5)
        loss.fill({"demo": torch.randn(5, 3, dtype=torch.float64)})
        loss({"demo": torch.randn(2, 3, dtype=torch.float64)})


def test_indefinite_population_raises():
    ref = ReferenceTensors(GaussianStats(np.zeros(3), np.eye(3), 10))
    sigma = torch.diag(torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64))
    with pytest.raises(StatisticsError, match="indefinite"):
        differentiable_fd(torch.zeros(3, dtype=torch.float64), sigma, ref)


def test_fdloss_argument_errors():
    ref = GaussianStats(np.zeros(3), np.eye(3), 10)
    with pytest.raises(ValueError, match="unknown statistics method 'adam'"):
        FDLoss({"demo": ref}, method="adam")
    with pytest.raises(ValueError, match=r"weights given for unknown space\(s\) \['other'\]"):
        FDLoss({"demo": ref}, weights={"other": 1.0})
    loss = FDLoss({"demo": ref}, method="ema", beta=0.5)
    with pytest.raises(KeyError, match="no features for space 'demo'"):
        loss.fill({"other": torch.zeros(4, 3)})
