"""FD from statistics against independent references: mpmath, scipy, closed forms."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import scipy.linalg

from fdpipe.frechet import (
    StatisticsError,
    frechet_distance,
    frechet_distance_features,
    CovarianceFactor,
    psd_sqrt,
    trace_sqrt_product,
    trace_sqrt_product_features,
)

D = 64


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _cov_with_spectrum(rng: np.random.Generator, eigenvalues: np.ndarray) -> np.ndarray:
    q = _orthogonal(rng, eigenvalues.shape[0])
    s = (q * eigenvalues) @ q.T
    return 0.5 * (s + s.T)


def _mp_matrix(a: np.ndarray) -> mpmath.matrix:
    # float64 -> mpf is exact, so the reference uses the very same inputs.
    return mpmath.matrix(a.tolist())


def _mp_psd_sqrt(m: mpmath.matrix, zero_below: mpmath.mpf) -> mpmath.matrix:
    w, q = mpmath.eigsy(m)
    roots = [mpmath.sqrt(x) if x > zero_below else mpmath.mpf(0) for x in w]
    return q * mpmath.diag(roots) * q.T


def _mp_trace_sqrt(s1: mpmath.matrix, s2: mpmath.matrix) -> mpmath.mpf:
    """tr((S1 S2)^{1/2}) at 50 digits via eigsy; |eigenvalues| < 1e-35 are exact zeros."""
    zero_below = mpmath.mpf("1e-35")
    root = _mp_psd_sqrt(s2, zero_below)
    w = mpmath.eigsy(root * s1 * root, eigvals_only=True)
    return mpmath.fsum(mpmath.sqrt(x) for x in w if x > zero_below)


def _mp_fd(mu1, s1, mu2, s2) -> mpmath.mpf:
    diff = [mpmath.mpf(a) - mpmath.mpf(b) for a, b in zip(mu1, mu2)]
    trace = sum(s1[i, i] + s2[i, i] for i in range(s1.rows))
    return mpmath.fsum(x * x for x in diff) + trace - 2 * _mp_trace_sqrt(s1, s2)


def _case(kind: str, rng: np.random.Generator):
    """Return float64 (mu1, S1, mu2, S2) and the same covariances in mpmath."""
    mu1 = rng.standard_normal(D)
    mu2 = rng.standard_normal(D) * 0.5
    if kind == "rank_deficient":
        # S = X^T X / n with n < d: exactly rank n in mpmath, rounded in float64.
        x1 = rng.standard_normal((20, D))
        x2 = rng.standard_normal((40, D)) * 1.5
        s1_mp = _mp_matrix(x1).T * _mp_matrix(x1) / 20
        s2_mp = _mp_matrix(x2).T * _mp_matrix(x2) / 40
        s1 = x1.T @ x1 / 20
        s2 = x2.T @ x2 / 40
        return mu1, s1, mu2, s2, s1_mp, s2_mp
    if kind == "well":
        s1 = _cov_with_spectrum(rng, rng.uniform(0.5, 2.0, D))
        s2 = _cov_with_spectrum(rng, rng.uniform(0.5, 2.0, D))
    else:
        s1 = _cov_with_spectrum(rng, np.logspace(0, -10, D))
        s2 = _cov_with_spectrum(rng, np.logspace(0, -10, D)[::-1].copy())
    return mu1, s1, mu2, s2, _mp_matrix(s1), _mp_matrix(s2)


@pytest.mark.parametrize("kind", ["well", "ill_conditioned", "rank_deficient"])
def test_fd_matches_mpmath(kind):
    mpmath.mp.dps = 50
    rng = np.random.default_rng({"well": 1, "ill_conditioned": 2, "rank_deficient": 3}[kind])
    mu1, s1, mu2, s2, s1_mp, s2_mp = _case(kind, rng)
    if kind == "ill_conditioned":
        w = np.linalg.eigvalsh(s1)
        assert w[-1] / w[0] == pytest.approx(1e10, rel=1e-2)

    expected = _mp_fd(mu1, s1_mp, mu2, s2_mp)
    got = frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2)

    rel = abs(mpmath.mpf(got) - expected) / abs(expected)
    assert rel < 1e-10, f"relative error {float(rel):.3g}"


def test_identical_statistics_near_zero():
    rng = np.random.default_rng(4)
    for s in (
        _cov_with_spectrum(rng, rng.uniform(0.1, 3.0, D)),
        _cov_with_spectrum(rng, np.logspace(0, -10, D)),
        np.cov(rng.standard_normal((20, D)), rowvar=False),
    ):
        mu = rng.standard_normal(D)
        fd = frechet_distance(mu1=mu, sigma1=s, mu2=mu, sigma2=s)
        assert 0.0 <= fd < 1e-9 * np.trace(s)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_isotropic_closed_form(scale):
    d = 48
    m = np.linspace(-1.0, 2.0, d)
    fd = frechet_distance(
        mu1=np.zeros(d), sigma1=np.eye(d), mu2=m, sigma2=scale**2 * np.eye(d)
    )
    expected = d * (1.0 - scale) ** 2 + m @ m
    assert fd == pytest.approx(expected, rel=1e-12, abs=1e-12)


def _fd_sqrtm(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean).real)


def test_matches_scipy_sqrtm():
    rng = np.random.default_rng(5)
    for d in (8, 64, 200):
        x1 = rng.standard_normal((3 * d, d)) @ rng.standard_normal((d, d))
        x2 = rng.standard_normal((3 * d, d)) @ rng.standard_normal((d, d)) + 0.3
        mu1, mu2 = x1.mean(0), x2.mean(0)
        s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
        got = frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2)
        assert got == pytest.approx(_fd_sqrtm(mu1, s1, mu2, s2), rel=1e-6)


@pytest.mark.parametrize("samples", [100, 12])
def test_cached_factor_matches_root(samples):
    # 12 samples in 30 dimensions: the reference is rank-deficient and the
    # pivoted Cholesky factor is 30 x 11.
    rng = np.random.default_rng(6)
    s1 = np.cov(rng.standard_normal((100, 30)), rowvar=False)
    s2 = np.cov(rng.standard_normal((samples, 30)) * 2.0, rowvar=False)
    mu = np.zeros(30)
    plain = frechet_distance(mu1=mu, sigma1=s1, mu2=mu, sigma2=s2)
    factor = CovarianceFactor.from_covariance(s2)
    assert factor.triangular and factor.rank == min(samples - 1, 30)
    cached = frechet_distance(mu1=mu, sigma1=s1, mu2=mu, sigma2=s2, factor2=factor)
    assert cached == plain
    with_root = frechet_distance(mu1=mu, sigma1=s1, mu2=mu, sigma2=s2, sqrt_sigma2=psd_sqrt(s2))
    assert with_root == pytest.approx(plain, rel=1e-13)
    scipy_value = _fd_sqrtm(mu, s1, mu, s2)
    assert plain == pytest.approx(scipy_value, rel=1e-8)


def test_factor_of_indefinite_covariance_raises():
    rng = np.random.default_rng(9)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    sigma = (q * np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.2, 0.1, -0.05])) @ q.T
    sigma = 0.5 * (sigma + sigma.T)
    with pytest.raises(StatisticsError, match="second statistics is indefinite"):
        frechet_distance(mu1=np.zeros(8), sigma1=np.eye(8), mu2=np.zeros(8), sigma2=sigma)


def test_psd_sqrt_of_rank_deficient():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 40))
    s = x.T @ x / 10
    root = psd_sqrt(s)
    np.testing.assert_allclose(root @ root, s, atol=1e-13 * np.abs(s).max())
    assert np.linalg.matrix_rank(root, tol=1e-8) == 10


def test_features_against_own_statistics():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) + 3.0
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu1=mu, sigma1=s, mu2=mu, sigma2=s) < 1e-6 * np.trace(s)
    assert frechet_distance_features(x, x) < 1e-6 * np.trace(s)


def test_nuclear_norm_path_matches_statistics():
    rng = np.random.default_rng(9)
    x1 = rng.standard_normal((30, 80))
    x2 = rng.standard_normal((50, 80)) * 0.7 + 0.2
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    via_stats = trace_sqrt_product(s1, psd_sqrt(s2))
    via_features = trace_sqrt_product_features(x1, x2)
    assert via_features == pytest.approx(via_stats, rel=1e-12)
    fd = frechet_distance_features(x1, x2)
    expected = frechet_distance(mu1=x1.mean(0), sigma1=s1, mu2=x2.mean(0), sigma2=s2)
    assert fd == pytest.approx(expected, rel=1e-12)


def _good(d=5):
    rng = np.random.default_rng(10)
    s = np.cov(rng.standard_normal((50, d)), rowvar=False)
    return np.zeros(d), s


def test_error_nan_mean():
    mu, s = _good()
    mu[2] = np.nan
    with pytest.raises(StatisticsError, match="first statistics: mean contains NaN or Inf"):
        frechet_distance(mu1=mu, sigma1=s, mu2=np.zeros(5), sigma2=s)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", [(1, 1), (0, 4), (4, 0)])
def test_error_non_finite_covariance(value, position):
    mu, s = _good()
    bad = s.copy()
    bad[position] = value
    with pytest.raises(StatisticsError, match="second statistics: covariance contains NaN or Inf"):
        frechet_distance(mu1=mu, sigma1=s, mu2=mu, sigma2=bad)


def test_error_shape_mismatch():
    mu, s = _good()
    with pytest.raises(StatisticsError, match=r"dimension mismatch: first statistics have d = 5, second have d = 4"):
        frechet_distance(mu1=mu, sigma1=s, mu2=np.zeros(4), sigma2=np.eye(4))
    with pytest.raises(StatisticsError, match=r"covariance has shape \(5, 4\), expected \(5, 5\)"):
        frechet_distance(mu1=mu, sigma1=s[:, :4], mu2=mu, sigma2=s)
    with pytest.raises(StatisticsError, match=r"sqrt_sigma2 has shape \(4, 4\)"):
        frechet_distance(mu1=mu, sigma1=s, mu2=mu, sigma2=s, sqrt_sigma2=np.eye(4))


def test_error_non_symmetric():
    mu, s = _good()
    bad = s.copy()
    bad[0, 3] += 0.1
    with pytest.raises(StatisticsError, match="first statistics: covariance is not symmetric"):
        frechet_distance(mu1=mu, sigma1=bad, mu2=mu, sigma2=s)


def test_error_indefinite_first():
    mu, s = _good()
    w, q = np.linalg.eigh(s)
    w[0] = -0.1 * w[-1]
    bad = (q * w) @ q.T
    bad = 0.5 * (bad + bad.T)
    with pytest.raises(StatisticsError, match="first covariance .* is indefinite"):
        frechet_distance(mu1=mu, sigma1=bad, mu2=mu, sigma2=s)


def test_error_indefinite_second():
    mu, s = _good()
    bad = s - 2.0 * np.eye(5) * np.linalg.eigvalsh(s)[-1]
    with pytest.raises(StatisticsError, match="second statistics is indefinite"):
        frechet_distance(mu1=mu, sigma1=s, mu2=mu, sigma2=bad)


def test_roundoff_negative_eigenvalues_are_zeroed():
    # A PSD matrix perturbed by -1e-12 relative stays usable: that is round-off
    # scale for covariances accumulated in lower precision.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((10, 20))
    s = x.T @ x / 10
    w, q = np.linalg.eigh(s)
    w[:10] = -1e-12 * w[-1]
    perturbed = 0.5 * ((q * w) @ q.T + ((q * w) @ q.T).T)
    mu = np.zeros(20)
    fd = frechet_distance(mu1=mu, sigma1=perturbed, mu2=mu, sigma2=np.eye(20))
    exact = frechet_distance(mu1=mu, sigma1=s, mu2=mu, sigma2=np.eye(20))
    assert fd == pytest.approx(exact, rel=1e-9)


def test_error_features_with_nan():
    x = np.ones((5, 3))
    x[0, 0] = np.nan
    with pytest.raises(StatisticsError, match="first features: features contain NaN or Inf"):
        frechet_distance_features(x, np.ones((5, 3)))


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_fd_scales_exactly_at_extreme_magnitudes(scale):
    # F^T S1 F would under- or overflow without rescaling inside the trace term.
    rng = np.random.default_rng(10)
    x1 = rng.standard_normal((200, 16))
    x2 = rng.standard_normal((200, 16)) * 1.3
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    base = frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2)
    root = np.sqrt(scale)
    scaled = frechet_distance(
        mu1=mu1 * root, sigma1=s1 * scale, mu2=mu2 * root, sigma2=s2 * scale
    )
    assert scaled / scale == pytest.approx(base, rel=1e-12)
    same = frechet_distance(mu1=mu1 * root, sigma1=s1 * scale, mu2=mu1 * root, sigma2=s1 * scale)
    assert 0.0 <= same < 1e-9 * np.trace(s1) * scale


def test_fd_overflow_raises():
    big = np.full(3, 1e200)
    with pytest.raises(StatisticsError, match="overflows float64"):
        frechet_distance(mu1=big, sigma1=np.eye(3), mu2=-big, sigma2=np.eye(3))


def test_covariance_factor_input_errors():
    nan = np.eye(3)
    nan[1, 1] = np.nan
    with pytest.raises(StatisticsError, match="reference: covariance contains NaN or Inf"):
        CovarianceFactor.from_covariance(nan, name="reference")
    with pytest.raises(StatisticsError, match="reference: covariance is not symmetric"):
        CovarianceFactor.from_covariance(np.array([[1.0, 5.0], [0.0, 1.0]]), name="reference")
    with pytest.raises(StatisticsError, match=r"must be a square matrix, got shape \(2, 3\)"):
        CovarianceFactor.from_covariance(np.ones((2, 3)), name="reference")


def test_factor_of_another_covariance_is_rejected():
    rng = np.random.default_rng(11)
    s = np.cov(rng.standard_normal((50, 5)), rowvar=False)
    other = CovarianceFactor.from_covariance(2.0 * s)
    with pytest.raises(StatisticsError, match="factor2 does not belong to sigma2"):
        frechet_distance(mu1=np.zeros(5), sigma1=s, mu2=np.zeros(5), sigma2=s, factor2=other)
