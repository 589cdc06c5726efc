"""Streaming moments, reference statistics files, EMA and queue estimators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdpipe.frechet import StatisticsError, psd_sqrt
from fdpipe.stats import EMAStatistics, GaussianStats, Moments, QueueStatistics


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_merge_uneven_shards_equals_one_pass(offset):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 12)) @ rng.standard_normal((12, 12)) + offset
    one = Moments(12)
    one.update(x)
    merged = Moments(12)
    for lo, hi in [(0, 1), (1, 8), (8, 400), (400, 401), (401, 1000)]:
        shard = Moments(12)
        shard.update(x[lo:hi])
        merged.merge(shard)
    # x - offset is exact (Sterbenz), so np.cov of it is an offset-free reference.
    reference = np.cov(x - offset, rowvar=False)
    assert merged.count == 1000
    assert _rel(merged.mean, one.mean) < 1e-12
    assert _rel(merged.covariance(), one.covariance()) < 1e-12
    assert _rel(merged.covariance(), reference) < 1e-12
    assert _rel(merged.mean, (x - offset).mean(0) + offset) < 1e-12


def test_moments_state_dict_round_trip():
    rng = np.random.default_rng(1)
    m = Moments(4)
    m.update(rng.standard_normal((30, 4)))
    copy = Moments.from_state_dict(m.state_dict())
    assert copy.count == 30
    np.testing.assert_array_equal(copy.mean, m.mean)
    np.testing.assert_array_equal(copy.m2, m.m2)


def test_moments_errors():
    m = Moments(3)
    with pytest.raises(ValueError, match=r"expected features of shape \(n, 3\)"):
        m.update(np.zeros((4, 2)))
    with pytest.raises(StatisticsError, match="features contain NaN or Inf"):
        m.update(np.array([[0.0, np.nan, 1.0]]))
    m.update(np.ones((1, 3)))
    with pytest.raises(StatisticsError, match="need more than 1 feature vectors"):
        m.covariance()


def test_gaussian_stats_save_load(tmp_path):
    rng = np.random.default_rng(2)
    stats = GaussianStats.from_features(rng.standard_normal((50, 6)), space="demo")
    path = tmp_path / "stats.npz"
    stats.save(path)
    loaded = GaussianStats.load(path, expect_dim=6, expect_space="demo")
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 50
    assert loaded.attrs == {"space": "demo"}
    assert "sqrt_sigma" in loaded.__dict__
    np.testing.assert_allclose(loaded.sqrt_sigma @ loaded.sqrt_sigma, stats.sigma, atol=1e-13)
    with pytest.raises(StatisticsError, match="dimension 6 but the space 'demo' produces 7-d"):
        GaussianStats.load(path, expect_dim=7, expect_space="demo")
    with pytest.raises(StatisticsError, match="computed in space 'demo', not 'other'"):
        GaussianStats.load(path, expect_space="other")


def test_gaussian_stats_stale_root_recomputed(tmp_path):
    rng = np.random.default_rng(3)
    sigma = np.cov(rng.standard_normal((40, 5)), rowvar=False)
    path = tmp_path / "stale.npz"
    np.savez(path, mu=np.zeros(5), sigma=sigma, sqrt_sigma=np.eye(5) * 7.0)
    loaded = GaussianStats.load(path)
    np.testing.assert_allclose(loaded.sqrt_sigma, psd_sqrt(sigma), atol=1e-14)


def test_gaussian_stats_missing_key(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, mu=np.zeros(3))
    with pytest.raises(StatisticsError, match=r"missing key\(s\) \['sigma'\]"):
        GaussianStats.load(path)


def _weighted_covariance(rows: np.ndarray, weights: np.ndarray):
    mean = weights @ rows
    centred = rows - mean
    return mean, (centred * weights[:, None]).T @ centred


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_ema_matches_weighted_brute_force(offset):
    rng = np.random.default_rng(4)
    d, beta = 5, 0.8
    pool = rng.standard_normal((20, d)) + offset
    batches = [rng.standard_normal((4, d)) + offset for _ in range(3)]
    ema = EMAStatistics(d, beta)
    ema.fill(torch.tensor(pool))
    for b in batches[:2]:
        ema.update(torch.tensor(b))
    mu, sigma = ema.population(torch.tensor(batches[2]))

    # Brute force: every row with its EMA weight.
    rows = [pool] + batches
    weights = [np.full(20, beta**3 / 20)]
    weights += [np.full(4, (1 - beta) * beta ** (2 - i) / 4) for i in range(3)]
    ref_mu, ref_sigma = _weighted_covariance(np.vstack(rows), np.concatenate(weights))
    assert _rel(mu.numpy(), ref_mu) < 1e-12
    tolerance = 1e-9 if offset else 1e-12
    assert _rel(sigma.numpy(), ref_sigma) < tolerance


def _queue_reference(history: np.ndarray, size: int):
    last = history[-size:]
    return last.mean(0), np.cov(last, rowvar=False, ddof=0)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_queue_matches_brute_force_after_wrap(offset):
    rng = np.random.default_rng(5)
    d, size = 4, 10
    history = rng.standard_normal((12, d)) + offset
    queue = QueueStatistics(d, size)
    queue.fill(torch.tensor(history))
    for step in range(7):
        batch = rng.standard_normal((3, d)) + offset
        mu, sigma = queue.population(torch.tensor(batch))
        ref_mu, ref_sigma = _queue_reference(np.vstack([history, batch]), size)
        assert _rel(mu.numpy(), ref_mu) < 1e-12, step
        assert _rel(sigma.numpy(), ref_sigma) < 1e-9, step
        queue.update(torch.tensor(batch))
        history = np.vstack([history, batch])


@pytest.mark.parametrize("kind", ["ema", "queue"])
def test_projected_population_matches_full(kind):
    rng = np.random.default_rng(6)
    d = 6
    root = torch.tensor(psd_sqrt(np.cov(rng.standard_normal((30, d)), rowvar=False)))
    est = EMAStatistics(d, 0.9, projection=root) if kind == "ema" else QueueStatistics(
        d, 8, projection=root
    )
    est.fill(torch.tensor(rng.standard_normal((16, d)) + 3.0))
    for _ in range(4):
        x = torch.tensor(rng.standard_normal((3, d)) + 3.0)
        mu, sigma = est.population(x)
        pop = est.projected_population(x)
        projected = pop.scale * pop.second_moment - torch.outer(pop.centre, pop.centre)
        torch.testing.assert_close(projected, root @ sigma @ root, rtol=0, atol=1e-12)
        torch.testing.assert_close(pop.mean, mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(pop.trace, torch.diagonal(sigma).sum(), rtol=1e-12, atol=0)
        est.update(x)


@pytest.mark.parametrize("kind", ["ema", "queue"])
def test_state_dict_round_trip(kind):
    rng = np.random.default_rng(7)
    d = 5
    root = torch.eye(d, dtype=torch.float64) * 2.0

    def make():
        if kind == "ema":
            return EMAStatistics(d, 0.9, projection=root)
        return QueueStatistics(d, 6, projection=root)

    est = make()
    est.fill(torch.tensor(rng.standard_normal((10, d))))
    est.update(torch.tensor(rng.standard_normal((2, d))))
    copy = make()
    copy.load_state_dict(est.state_dict())
    x = torch.tensor(rng.standard_normal((2, d)))
    for a, b in zip(est.population(x), copy.population(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    projected_copy = copy.projected_population(x)
    projected = est.projected_population(x)
    assert projected_copy.second_moment.equal(projected.second_moment)
    assert projected_copy.scale == projected.scale


@pytest.mark.parametrize("kind", ["ema", "queue"])
def test_update_reuses_loss_moment_exactly(kind):
    # update(x) after projected_population(x) copies the second moment that
    # the loss computed. The state must be bitwise what a fresh update gives,
    # also across the queue's wrap-around. A different batch must not pick
    # up the kept value.
    rng = np.random.default_rng(8)
    d = 7
    root = torch.tensor(psd_sqrt(np.cov(rng.standard_normal((40, d)), rowvar=False)))

    def make():
        if kind == "ema":
            return EMAStatistics(d, 0.8, projection=root, keep_second_moment=False)
        return QueueStatistics(d, 9, projection=root, keep_second_moment=False)

    pool = torch.tensor(rng.standard_normal((20, d)))
    seen, fresh = make(), make()
    seen.fill(pool)
    fresh.fill(pool)
    for step in range(8):
        x = torch.tensor(rng.standard_normal((4, d)))
        seen.projected_population(x)
        if step == 3:
            # the loss saw one batch, the update gets another
            x = torch.tensor(rng.standard_normal((4, d)))
        seen.update(x)
        fresh.update(x)
        for name, value in fresh.state_dict().items():
            assert torch.equal(seen.state_dict()[name], value), (step, name)
        reference = make()
        reference.load_state_dict(fresh.state_dict())
        expected = reference.projected_population(x).second_moment
        torch.testing.assert_close(
            seen.projected_population(x).second_moment, expected, rtol=0, atol=0
        )


def test_estimator_errors():
    ema = EMAStatistics(3, 0.9)
    with pytest.raises(RuntimeError, match="before fill"):
        ema.population(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        EMAStatistics(3, 1.0)
    ema.fill(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(StatisticsError, match="EMA update: features contain NaN or Inf"):
        ema.update(torch.tensor([[0.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match=r"expected features of shape \(B, 3\)"):
        ema.population(torch.zeros(2, 4))
    queue = QueueStatistics(3, 4)
    with pytest.raises(ValueError, match="needs at least 4 features to fill"):
        queue.fill(torch.zeros(2, 3))
    queue.fill(torch.randn(4, 3))
    with pytest.raises(ValueError, match="batch of 5 is larger than the queue"):
        queue.population(torch.zeros(5, 3))


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_queue_population_after_many_wraps(offset):
    """Queue of size N: after 300 steps (90 wraps) the statistics of the queue with
    the batch in the oldest slots equal those of the last N features from scratch."""
    rng = np.random.default_rng(11)
    d, size, batch_size = 6, 20, 6
    history = rng.standard_normal((size, d)) * rng.uniform(0.5, 2, d) + offset
    queue = QueueStatistics(d, size)
    queue.fill(torch.tensor(history))
    for step in range(300):
        batch = rng.standard_normal((batch_size, d)) + offset
        history = np.vstack([history, batch])
        mu, sigma = queue.population(torch.tensor(batch))
        if step % 50 == 49:
            ref_mu, ref_sigma = _queue_reference(history, size)
            assert _rel(mu.numpy(), ref_mu) < 1e-10, step
            assert _rel(sigma.numpy(), ref_sigma) < 1e-10, step
        queue.update(torch.tensor(batch))


def test_kept_moment_not_used_after_state_changes():
    rng = np.random.default_rng(12)
    d = 5
    root = torch.tensor(psd_sqrt(np.cov(rng.standard_normal((30, d)), rowvar=False)))
    pool = torch.tensor(rng.standard_normal((12, d)))
    x = torch.tensor(rng.standard_normal((3, d)))
    for change in ("beta", "buffer"):
        seen = EMAStatistics(d, 0.8, projection=root, keep_second_moment=False)
        fresh = EMAStatistics(d, 0.8, projection=root, keep_second_moment=False)
        seen.fill(pool)
        fresh.fill(pool)
        seen.projected_population(x)
        for est in (seen, fresh):
            if change == "beta":
                est.beta = 0.3
            else:
                est.projected_m2.mul_(2.0)
        seen.update(x)
        fresh.update(x)
        assert torch.equal(seen.projected_m2, fresh.projected_m2), change
