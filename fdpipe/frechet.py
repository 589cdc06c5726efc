"""Frechet distance between Gaussians, in float64, without complex matrix roots.

The trace term tr((S1 S2)^{1/2}) equals the sum of the square roots of the
eigenvalues of the symmetric matrix R S1 R with R = S2^{1/2}. R belongs to the
reference statistics, so it is computed once and cached with them; each
distance then costs one symmetric eigenvalue decomposition.
"""

from __future__ import annotations

import numpy as np

# Eigenvalues below ROUNDOFF_FACTOR * sqrt(d) * eps * max|eigenvalue| are
# treated as exact zeros: with rank-deficient covariances, clamping them at
# zero alone leaves relative FD errors of about 1e-7 at d = 64.
ROUNDOFF_FACTOR = 1.0


class StatisticsError(ValueError):
    """Raised when Gaussian statistics are unusable (shape, NaN, not PSD)."""


def roundoff_threshold(eigenvalues: np.ndarray) -> float:
    """Return the magnitude below which an eigenvalue is round-off."""
    d = eigenvalues.shape[-1]
    scale = float(np.max(np.abs(eigenvalues))) if eigenvalues.size else 0.0
    return ROUNDOFF_FACTOR * np.sqrt(d) * np.finfo(np.float64).eps * scale


def _check_mean_cov(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1:
        raise StatisticsError(f"{name}: mean must be a vector, got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise StatisticsError(
            f"{name}: covariance has shape {sigma.shape}, expected ({d}, {d}) "
            f"to match the mean"
        )
    if not np.all(np.isfinite(mu)):
        raise StatisticsError(f"{name}: mean contains NaN or Inf")
    if not np.all(np.isfinite(sigma)):
        raise StatisticsError(f"{name}: covariance contains NaN or Inf")
    scale = float(np.max(np.abs(sigma))) if sigma.size else 0.0
    asym = float(np.max(np.abs(sigma - sigma.T))) if sigma.size else 0.0
    if asym > 1e-8 * max(scale, np.finfo(np.float64).tiny):
        raise StatisticsError(
            f"{name}: covariance is not symmetric (max |S - S^T| = {asym:.3g}, "
            f"max |S| = {scale:.3g})"
        )


def psd_sqrt(sigma: np.ndarray, *, name: str = "covariance") -> np.ndarray:
    """Return the symmetric PSD square root of a covariance matrix.

    Raises StatisticsError when an eigenvalue is negative beyond round-off.
    """
    sym = 0.5 * (sigma + sigma.T)
    w, v = np.linalg.eigh(sym)
    tol = roundoff_threshold(w)
    if w.size and w[0] < -max(tol, 1e3 * tol):
        raise StatisticsError(
            f"{name}: covariance is indefinite (smallest eigenvalue {w[0]:.3g}, "
            f"round-off threshold {tol:.3g})"
        )
    w = np.where(w > tol, w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sqrt_sigma2: np.ndarray) -> float:
    """Return tr((sigma1 sigma2)^{1/2}) given the PSD root of sigma2."""
    product = sqrt_sigma2 @ sigma1 @ sqrt_sigma2
    product = 0.5 * (product + product.T)
    w = np.linalg.eigvalsh(product)
    tol = roundoff_threshold(w)
    if w.size and w[0] < -max(tol, 1e3 * tol):
        raise StatisticsError(
            f"R S1 R has a negative eigenvalue {w[0]:.3g} beyond round-off "
            f"({tol:.3g}); one covariance is not positive semi-definite"
        )
    w = np.where(w > tol, w, 0.0)
    return float(np.sum(np.sqrt(w)))


def frechet_distance(
    *,
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    sqrt_sigma2: np.ndarray | None = None,
) -> float:
    """Return the Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    All inputs are converted to float64. Pass ``sqrt_sigma2`` (the PSD root of
    sigma2, see ``psd_sqrt``) to skip its decomposition when the second
    Gaussian is a fixed reference.
    """
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    _check_mean_cov(mu1, sigma1, "first statistics")
    _check_mean_cov(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise StatisticsError(
            f"dimension mismatch: first statistics have d = {mu1.shape[0]}, "
            f"second have d = {mu2.shape[0]}"
        )
    if sqrt_sigma2 is None:
        sqrt_sigma2 = psd_sqrt(sigma2, name="second statistics")
    diff = mu1 - mu2
    trace_term = trace_sqrt_product(sigma1, sqrt_sigma2)
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_term)
    # Round-off can push an FD of (nearly) identical Gaussians a little below 0.
    total = float(np.trace(sigma1) + np.trace(sigma2))
    if fd < 0.0:
        if fd < -1e-9 * max(total, 1.0):
            raise StatisticsError(f"Frechet distance is negative ({fd:.3g})")
        fd = 0.0
    return fd
