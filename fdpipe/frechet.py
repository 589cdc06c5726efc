"""Frechet distance between Gaussians, in float64, without complex matrix roots.

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
For any factor F of S2 (F F^T = S2) the trace term is the sum of the square
roots of the eigenvalues of the symmetric matrix F^T S1 F. fdpipe takes F
as the Cholesky factor of S2 (``CovarianceFactor``): it belongs to the
reference statistics, so it is computed once and cached with them, and its
triangular shape makes F^T S1 F cost about 0.8 of one d x d x d product.
Each distance then costs that product and one symmetric eigenvalue
decomposition (``torch.linalg.eigvalsh``, MKL in torch's x86 wheels). On the
Intel Xeon in benchmarks/BENCHMARKS.md it took less than half the time of
the OpenBLAS one in numpy and scipy. On the AMD EPYC there, both took the
same time.

The module also holds the autograd functions behind the differentiable FD of
``fdpipe.loss``. They use the symmetric root R of the reference, return the
exact trace term and cap the gradient of the square root at small
eigenvalues (see ``EIGEN_FLOOR_REL``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg
import torch

from fdpipe.eigen import (
    EigenError,
    SymmetricEigen,
    apply_spectral,
    resolve_eigensolver,
    symmetric_eigen,
)

log = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)

# Eigenvalues below ROUNDOFF_FACTOR * sqrt(d) * eps * max|eigenvalue| are
# treated as exact zeros: with rank-deficient covariances, clamping them at
# zero alone leaves relative FD errors of about 1e-7 at d = 64.
ROUNDOFF_FACTOR = 1.0

# A negative eigenvalue below -INDEFINITE_REL_TOL * max eigenvalue means the
# covariance is indefinite and raises StatisticsError. Between that and the
# round-off threshold the eigenvalue is set to zero with a logged warning;
# covariances accumulated in float32 land there.
INDEFINITE_REL_TOL = 1e-6

# A covariance whose max |S - S^T| exceeds SYMMETRY_REL_TOL * max |S| raises.
SYMMETRY_REL_TOL = 1e-8

# In the differentiable trace term the derivative 1 / (2 sqrt(lambda)) uses
# max(lambda, EIGEN_FLOOR_REL * max eigenvalue), so it is bounded by
# 1 / (2 sqrt(EIGEN_FLOOR_REL * max eigenvalue)) and never NaN or Inf. The
# value itself stays exact.
EIGEN_FLOOR_REL = 1e-10

# Target relative accuracy of the trace term. It is measured against half the
# sum of the two traces, the size of the terms that cancel in the FD.
ACCURACY_REL = 1e-12

# Row blocks used to form only the lower triangle of R S R (see _sandwich_lower).
_SANDWICH_BLOCKS = 8

# Magnitudes of |S1| and |S1| |F|^2 within which the trace term is formed
# without rescaling: far from float64's under- and overflow.
_SAFE_SCALE_MIN = 2.0**-300
_SAFE_SCALE_MAX = 2.0**300

# Column blocks of the triangular sandwich (CovarianceFactor.sandwich_lower);
# 12 was the fastest of 4 to 24 at d = 2048 on one core.
_FACTOR_BLOCKS = 12


class StatisticsError(ValueError):
    """Raised when Gaussian statistics are unusable (shape, NaN, not PSD)."""


def roundoff_threshold(eigenvalues: np.ndarray | torch.Tensor) -> float:
    """Return the magnitude below which an eigenvalue is round-off."""
    d = eigenvalues.shape[-1]
    if d == 0:
        return 0.0
    scale = float(abs(eigenvalues).max())
    return ROUNDOFF_FACTOR * float(np.sqrt(d)) * _EPS * scale


def _as_float64(value, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise StatisticsError(f"{name} cannot be converted to float64: {err}") from err


def check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    """Raise StatisticsError unless (mu, sigma) is a finite mean and symmetric covariance."""
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
    check_covariance(sigma, name)


def check_covariance(sigma: np.ndarray, name: str) -> None:
    """Raise StatisticsError unless sigma is a finite, square, symmetric matrix."""
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise StatisticsError(f"{name}: covariance must be a square matrix, got shape {sigma.shape}")
    if sigma.shape[0] == 0:
        return
    scale, asym = _scale_and_asymmetry(sigma)
    if not (np.isfinite(scale) and np.isfinite(asym)):
        raise StatisticsError(f"{name}: covariance contains NaN or Inf")
    if asym > SYMMETRY_REL_TOL * max(scale, np.finfo(np.float64).tiny):
        raise StatisticsError(
            f"{name}: covariance is not symmetric (max |S - S^T| = {asym:.3g}, "
            f"max |S| = {scale:.3g})"
        )


def _scale_and_asymmetry(sigma: np.ndarray) -> tuple[float, float]:
    """Return (max |S|, max |S - S^T|) in one blocked pass; NaN or Inf propagate."""
    matrix = torch.from_numpy(np.ascontiguousarray(sigma))
    d = matrix.shape[0]
    scale = asym = 0.0
    step = max(1, -(-d // _SANDWICH_BLOCKS))
    for start in range(0, d, step):
        stop = min(d, start + step)
        rows = matrix[start:stop, :stop]
        columns = matrix[:stop, start:stop].T
        block_scale = float(rows.abs().max())
        block_asym = float((rows - columns).abs().max())
        # Checked per block because Python's max() drops a NaN argument.
        if not (np.isfinite(block_scale) and np.isfinite(block_asym)):
            return float("nan"), float("nan")
        scale = max(scale, block_scale)
        asym = max(asym, block_asym)
    return scale, asym


def _zero_roundoff(w: torch.Tensor, what: str) -> torch.Tensor:
    """Set round-off eigenvalues to zero; raise on clearly negative ones."""
    if w.numel() == 0:
        return w
    top = float(w[-1])
    smallest = float(w[0])
    tol = roundoff_threshold(w)
    if smallest < -INDEFINITE_REL_TOL * max(top, 0.0) or (top <= 0.0 and smallest < 0.0):
        raise StatisticsError(
            f"{what} is indefinite: smallest eigenvalue {smallest:.3g}, largest "
            f"{top:.3g}; a covariance must be positive semi-definite"
        )
    if smallest < -tol:
        count = int((w < -tol).sum())
        log.warning(
            "%s: %d eigenvalue(s) down to %.3g are negative beyond float64 "
            "round-off (%.3g) but within %.0e of the largest; set to zero",
            what, count, smallest, tol, INDEFINITE_REL_TOL,
        )
    return torch.where(w > tol, w, torch.zeros((), dtype=w.dtype, device=w.device))


def psd_sqrt(sigma: np.ndarray, *, name: str = "covariance") -> np.ndarray:
    """Return the symmetric PSD square root of a covariance matrix.

    Round-off eigenvalues become exact zeros. Raises StatisticsError when an
    eigenvalue is negative beyond round-off.
    """
    sym = torch.from_numpy(np.ascontiguousarray(_as_float64(sigma, name)))
    sym = 0.5 * (sym + sym.T)
    w, v = _eigh(sym, name)
    w = _zero_roundoff(w, name)
    return ((v * w.sqrt()) @ v.T).numpy()


def _eigh(matrix: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError as err:
        raise StatisticsError(f"{what}: eigendecomposition failed: {err}") from err


def _eigvalsh(matrix: torch.Tensor, what: str) -> torch.Tensor:
    try:
        return torch.linalg.eigvalsh(matrix, UPLO="L")
    except torch.linalg.LinAlgError as err:
        raise StatisticsError(f"{what}: eigenvalue decomposition failed: {err}") from err


def _sandwich_lower(root: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Return a matrix whose lower triangle is that of root @ sigma @ root.

    The upper triangle is left unset because the symmetric eigensolver reads
    the lower one only. Row block i multiplies only the columns up to the end
    of its block, which saves about 45% of the second product's flops.
    """
    d = root.shape[0]
    half = sigma @ root
    out = torch.empty_like(half)
    edges = np.linspace(0, d, min(_SANDWICH_BLOCKS, max(d, 1)) + 1).astype(int)
    for start, stop in zip(edges[:-1], edges[1:]):
        if stop > start:
            out[start:stop, :stop] = root[start:stop] @ half[:, :stop]
    return out


@dataclass(frozen=True)
class CovarianceFactor:
    """A factor F of a covariance, F F^T = sigma, for the trace term.

    Usually a Cholesky factor: ``matrix`` is lower triangular (trapezoidal,
    d x r, for a pivoted factor of rank r) and F = P ``matrix`` with P the
    row permutation ``perm`` (None for no pivoting). F^T S1 F has the
    nonzero eigenvalues of S1 sigma, and its triangular structure makes it
    cheaper to form than R S1 R with the dense root R. When the
    factorisation cannot be trusted, ``matrix`` is the symmetric PSD root
    and ``triangular`` is False.
    """

    matrix: torch.Tensor
    perm: np.ndarray | None = None
    triangular: bool = True

    @classmethod
    def from_covariance(cls, sigma: np.ndarray, *, name: str = "covariance") -> "CovarianceFactor":
        """Factor a symmetric PSD covariance; raise StatisticsError if indefinite.

        Tries LAPACK's Cholesky (dpotrf), then the pivoted one (dpstrf), which
        stops at the numerical rank. By Weyl's inequality, the norm of the
        remainder that the pivoted factor leaves out bounds how far sigma can
        be from PSD. When that norm exceeds INDEFINITE_REL_TOL of the largest
        variance, an eigendecomposition decides: it names a negative
        eigenvalue or returns the symmetric root as the factor.
        """
        sigma = np.ascontiguousarray(_as_float64(sigma, name))
        check_covariance(sigma, name)
        return cls._of_checked(sigma, name)

    @classmethod
    def _of_checked(cls, sigma: np.ndarray, name: str) -> "CovarianceFactor":
        """Factor a float64 covariance that ``check_covariance`` has accepted."""
        matrix = torch.from_numpy(sigma)
        lower, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            return cls(lower)
        packed, pivots, rank, info = scipy.linalg.lapack.dpstrf(sigma, lower=1, tol=-1.0)
        if info < 0:
            raise StatisticsError(f"{name}: pivoted Cholesky failed: invalid argument {-info}")
        perm = pivots - 1
        factor = torch.from_numpy(np.tril(packed)[:, :rank].copy())
        permuted = matrix[perm][:, perm]
        remainder = permuted[rank:, rank:] - factor[rank:] @ factor[rank:].T
        largest = float(torch.diagonal(matrix).abs().max()) if sigma.size else 0.0
        if float(torch.linalg.matrix_norm(remainder)) > INDEFINITE_REL_TOL * largest:
            return cls(torch.from_numpy(psd_sqrt(sigma, name=name)), None, False)
        return cls(factor, perm, True)

    @property
    def rank(self) -> int:
        return int(self.matrix.shape[1])

    @cached_property
    def max_abs(self) -> float:
        """Largest entry magnitude of the factor (0 when it is empty)."""
        return float(self.matrix.abs().max()) if self.matrix.numel() else 0.0

    def dense(self) -> torch.Tensor:
        """Return F as a d x r matrix."""
        if self.perm is None:
            return self.matrix
        out = torch.zeros_like(self.matrix)
        out[torch.from_numpy(self.perm)] = self.matrix
        return out

    def sandwich_lower(self, sigma1: torch.Tensor) -> torch.Tensor:
        """Return an r x r matrix whose lower triangle is that of F^T sigma1 F."""
        if not self.triangular:
            return _sandwich_lower(self.matrix, sigma1)
        if self.perm is not None:
            index = torch.from_numpy(self.perm).to(sigma1.device)
            sigma1 = sigma1[index][:, index]
        lower = self.matrix
        d, r = lower.shape
        # Column block [a, b) of the lower-trapezoidal factor is zero above
        # row a, and the lower triangle of the result needs columns < b only:
        # about 0.8 of one d x d x d product instead of 1.55 for R S1 R.
        half = lower.new_empty(d, r)
        out = lower.new_empty(r, r)
        edges = np.linspace(0, r, min(_FACTOR_BLOCKS, max(r, 1)) + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            half[:, a:b] = sigma1[:, a:] @ lower[a:, a:b]
        for a, b in zip(edges[:-1], edges[1:]):
            out[a:b, :b] = lower[a:, a:b].T @ half[a:, :b]
        return out


def trace_sqrt_product(
    sigma1: np.ndarray,
    sqrt_sigma2: np.ndarray | CovarianceFactor,
    *,
    scale: float | None = None,
) -> float:
    """Return tr((sigma1 sigma2)^{1/2}) given a factor F of sigma2, F F^T = sigma2.

    ``sqrt_sigma2`` is the PSD root R of sigma2 or a ``CovarianceFactor``.
    The fast path takes the eigenvalues of F^T sigma1 F. Each carries an
    absolute error of about delta = eps * max eigenvalue, which the square
    root turns into up to sqrt(delta) near zero. The errors are estimated as
    the root-sum-square of sqrt(l + delta) - sqrt(l - delta) over the
    eigenvalues l. When that exceeds ACCURACY_REL * ``scale`` (default: the
    trace term itself), the trace term is recomputed as the sum of singular
    values of G^T F, with G a pivoted Cholesky factor of sigma1. Singular
    values carry absolute errors of about eps * max singular value, with no
    square root in between. Raises StatisticsError when sigma1 is indefinite.
    """
    s1 = torch.from_numpy(np.ascontiguousarray(sigma1, dtype=np.float64))
    if isinstance(sqrt_sigma2, CovarianceFactor):
        factor = sqrt_sigma2
    else:
        root = np.ascontiguousarray(sqrt_sigma2, dtype=np.float64)
        factor = CovarianceFactor(torch.from_numpy(root), None, False)
    # F^T S1 F scales like |S1| |F|^2, which under- or overflows float64 for
    # covariances near 1e-160 or 1e160. Outside a safe range, powers of two
    # bring both to about 1 exactly and the trace term scales back by
    # sqrt(a) * c. Inside it no copy is made.
    a = _power_of_two(float(s1.abs().max()) if s1.numel() else 0.0)
    c = _power_of_two(factor.max_abs)
    if _SAFE_SCALE_MIN <= a * c * c <= _SAFE_SCALE_MAX and _SAFE_SCALE_MIN <= a <= _SAFE_SCALE_MAX:
        return _trace_sqrt_scaled(s1, factor, scale)
    if scale is not None:
        scale = scale / (float(np.sqrt(a)) * c)
    s1 = s1 / a
    factor = CovarianceFactor(factor.matrix / c, factor.perm, factor.triangular)
    return _trace_sqrt_scaled(s1, factor, scale) * float(np.sqrt(a)) * c


def _power_of_two(magnitude: float) -> float:
    """Return an even power of two near ``magnitude`` (1 for 0), so its root is exact."""
    if magnitude <= 0.0 or not np.isfinite(magnitude):
        return 1.0
    exponent = 2 * int(round(np.log2(magnitude) / 2))
    return float(np.ldexp(1.0, exponent))


def _trace_sqrt_scaled(
    s1: torch.Tensor, factor: CovarianceFactor, scale: float | None
) -> float:
    """Return the trace term of ``trace_sqrt_product`` for inputs scaled to about 1."""
    w = _eigvalsh(factor.sandwich_lower(s1), "F^T S1 F")
    w = _zero_roundoff(w, "first covariance (seen through F^T S1 F, F F^T = second)")
    value = float(w.sqrt().sum())
    if w.numel() == 0:
        return value
    delta = _EPS * float(w[-1])
    spread = (w + delta).sqrt() - (w - delta).clamp_min(0.0).sqrt()
    error = float(spread.square().sum().sqrt())
    if error <= ACCURACY_REL * (value if scale is None else scale):
        return value
    log.debug(
        "trace term error estimate %.3g exceeds %.0e of %.3g; using singular values",
        error, ACCURACY_REL, value if scale is None else scale,
    )
    return _trace_sqrt_singular(s1.numpy(), factor.dense())


def _trace_sqrt_singular(sigma1: np.ndarray, factor2: torch.Tensor) -> float:
    """Return tr((sigma1 F F^T)^{1/2}) as the nuclear norm of G^T F, G G^T = sigma1.

    LAPACK's pivoted Cholesky (dpstrf) stops at the numerical rank r of
    sigma1 (trailing pivots below d eps max diag), so G is d x r and a
    rank-deficient sigma1 costs less.
    """
    d = sigma1.shape[0]
    packed, pivots, rank, info = scipy.linalg.lapack.dpstrf(sigma1, lower=1, tol=-1.0)
    if info < 0:
        raise StatisticsError(f"pivoted Cholesky failed: invalid argument {-info}")
    if rank == 0:
        return 0.0
    factor = np.zeros((d, rank))
    factor[pivots - 1] = np.tril(packed)[:, :rank]
    singular = torch.linalg.svdvals(torch.from_numpy(factor).T @ factor2)
    return float(singular.sum())


def frechet_distance(
    *,
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    sqrt_sigma2: np.ndarray | None = None,
    factor2: CovarianceFactor | None = None,
) -> float:
    """Return the Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    All inputs are converted to float64. When the second Gaussian is a fixed
    reference, pass its ``CovarianceFactor`` as ``factor2`` (or its PSD root
    from ``psd_sqrt`` as ``sqrt_sigma2``) to skip factoring sigma2 on every
    call. Raises StatisticsError on NaN or Inf, mismatched shapes, and
    non-symmetric or indefinite covariances.
    """
    mu1 = _as_float64(mu1, "first mean")
    mu2 = _as_float64(mu2, "second mean")
    sigma1 = _as_float64(sigma1, "first covariance")
    sigma2 = _as_float64(sigma2, "second covariance")
    check_gaussian(mu1, sigma1, "first statistics")
    check_gaussian(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise StatisticsError(
            f"dimension mismatch: first statistics have d = {mu1.shape[0]}, "
            f"second have d = {mu2.shape[0]}"
        )
    if factor2 is not None:
        if factor2.matrix.shape[0] != sigma2.shape[0]:
            raise StatisticsError(
                f"factor2 has {factor2.matrix.shape[0]} rows, expected {sigma2.shape[0]}"
            )
        # F F^T = sigma2 implies |F|_F^2 = tr(sigma2): a cheap check that the
        # cached factor belongs to this covariance.
        trace2 = float(np.trace(sigma2))
        factor_trace = float(factor2.matrix.square().sum())
        if abs(factor_trace - trace2) > 1e-8 * max(abs(trace2), np.finfo(np.float64).tiny):
            raise StatisticsError(
                f"factor2 does not belong to sigma2: |F|^2 = {factor_trace:.6g} but "
                f"tr(sigma2) = {trace2:.6g}; build it with CovarianceFactor.from_covariance(sigma2)"
            )
    elif sqrt_sigma2 is not None:
        sqrt_sigma2 = _as_float64(sqrt_sigma2, "sqrt_sigma2")
        if sqrt_sigma2.shape != sigma2.shape:
            raise StatisticsError(
                f"sqrt_sigma2 has shape {sqrt_sigma2.shape}, expected {sigma2.shape}"
            )
        factor2 = CovarianceFactor(torch.from_numpy(sqrt_sigma2), None, False)
    else:
        # check_gaussian has validated sigma2 above, so skip the second pass.
        factor2 = CovarianceFactor._of_checked(
            np.ascontiguousarray(sigma2), "second statistics"
        )
    diff = mu1 - mu2
    total = float(np.trace(sigma1) + np.trace(sigma2))
    trace_term = trace_sqrt_product(sigma1, factor2, scale=0.5 * total)
    with np.errstate(over="ignore"):
        mean_term = float(diff @ diff)
    fd = mean_term + total - 2.0 * trace_term
    if not np.isfinite(fd):
        raise StatisticsError(
            f"Frechet distance overflows float64 (|mu1 - mu2|^2 = {mean_term:.3g}, "
            f"traces {total:.3g}); rescale the features"
        )
    return _clip_negative(fd, total)


def _clip_negative(fd: float, total_trace: float) -> float:
    # Cancellation can push the FD of (nearly) identical Gaussians a little
    # below 0; anything more negative than round-off is a bug or bad input.
    if fd < 0.0:
        if fd < -1e-9 * max(total_trace, np.finfo(np.float64).tiny):
            raise StatisticsError(
                f"Frechet distance is negative ({fd:.3g}) beyond round-off of the "
                f"traces ({total_trace:.3g})"
            )
        return 0.0
    return fd


def trace_sqrt_product_features(
    features1: np.ndarray, features2: np.ndarray, *, ddof: int = 1
) -> float:
    """Return tr((S1 S2)^{1/2}) for the sample covariances of two feature sets.

    With centred, scaled features A = (X1 - mean) / sqrt(n1 - ddof) and B
    likewise, S1 = A^T A and S2 = B^T B, so the trace term is the nuclear norm
    of A B^T. That needs an n1 x n2 product and its singular values, which is
    exact and much cheaper than a d x d decomposition when n1, n2 < d.
    """
    a = _centred_scaled(features1, ddof, "first features")
    b = _centred_scaled(features2, ddof, "second features")
    if a.shape[1] != b.shape[1]:
        raise StatisticsError(
            f"dimension mismatch: first features have d = {a.shape[1]}, "
            f"second have d = {b.shape[1]}"
        )
    cross = torch.from_numpy(a) @ torch.from_numpy(b).T
    singular = torch.linalg.svdvals(cross)
    return float(singular.sum())


def _centred_scaled(features: np.ndarray, ddof: int, name: str) -> np.ndarray:
    x = _as_float64(features, name)
    if x.ndim != 2:
        raise StatisticsError(f"{name}: expected shape (n, d), got {x.shape}")
    if x.shape[0] - ddof <= 0:
        raise StatisticsError(
            f"{name}: need more than {ddof} feature vectors, have {x.shape[0]}"
        )
    if not np.all(np.isfinite(x)):
        raise StatisticsError(f"{name}: features contain NaN or Inf")
    return (x - x.mean(axis=0)) / np.sqrt(x.shape[0] - ddof)


def frechet_distance_features(
    features1: np.ndarray, features2: np.ndarray, *, ddof: int = 1
) -> float:
    """Return the FD between the Gaussians fitted to two feature sets (n, d).

    Uses the nuclear-norm form of the trace term; see
    ``trace_sqrt_product_features``.
    """
    x1 = _as_float64(features1, "first features")
    x2 = _as_float64(features2, "second features")
    trace_term = trace_sqrt_product_features(x1, x2, ddof=ddof)
    diff = x1.mean(axis=0) - x2.mean(axis=0)
    total = 0.0
    for x in (x1, x2):
        centred = x - x.mean(axis=0)
        total += float(np.einsum("ij,ij->", centred, centred)) / (x.shape[0] - ddof)
    return _clip_negative(float(diff @ diff) + total - 2.0 * trace_term, total)


# ---------------------------------------------------------------------------
# Differentiable trace term
# ---------------------------------------------------------------------------


def _spectrum(
    matrix: torch.Tensor, what: str, *, check_input: bool = True, eigensolver: str = "torch"
) -> tuple[torch.Tensor, SymmetricEigen, torch.Tensor]:
    """Return (sqrt eigenvalues, decomposition, derivative weights) of a PSD matrix.

    The derivative weight of eigenvalue l is 1 / (2 sqrt(max(l, floor))) with
    floor = EIGEN_FLOOR_REL * max eigenvalue. With ``check_input=False`` the
    caller has checked the inputs the matrix was built from, and NaN or Inf
    that arise anyway are caught in the eigenvalues. The ``tridiagonal``
    solver overwrites ``matrix``.
    """
    if check_input and not bool(torch.isfinite(matrix).all()):
        raise StatisticsError(f"{what} contains NaN or Inf")
    try:
        eigen = symmetric_eigen(matrix, eigensolver, what)
    except EigenError as err:
        raise StatisticsError(str(err)) from err
    w = eigen.values
    if not bool(torch.isfinite(w).all()):
        raise StatisticsError(f"{what} contains NaN or Inf (non-finite eigenvalues)")
    top = float(w[-1])
    if top <= 0.0:
        raise StatisticsError(
            f"{what} has no positive eigenvalue (largest {top:.3g}); the "
            f"covariance is zero or the statistics are degenerate"
        )
    w = _zero_roundoff(w, what)
    floor = EIGEN_FLOOR_REL * top
    weights = 0.5 / w.clamp_min(floor).sqrt()
    return w.sqrt(), eigen, weights


class _TraceSqrtPSD(torch.autograd.Function):
    """tr(M^{1/2}) of a symmetric PSD matrix; gradient Q diag(weights) Q^T."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        sym = 0.5 * (matrix + matrix.T)
        roots, eigen, weights = _spectrum(sym, "population covariance seen through R S R")
        (q,) = eigen.tensors
        ctx.save_for_backward(q, weights)
        return roots.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        q, weights = ctx.saved_tensors
        return grad_output * ((q * weights) @ q.T)


class _TraceSqrtLowRank(torch.autograd.Function):
    """tr(M^{1/2}) for M = s * second_moment - c c^T.

    ``second_moment`` is detached and already holds the batch factor Y, so
    that Y enters M as coef * Y^T Y; Y and c carry the gradients. The
    backward pass applies Q diag(weights) Q^T to the B + 1 rows of Y and c
    in O(B d^2).
    """

    @staticmethod
    def forward(ctx, second_moment, scale: float, factor, coef: float, centre, solver: str):
        for name, tensor in (("batch factor", factor), ("population mean", centre)):
            if not bool(torch.isfinite(tensor).all()):
                raise StatisticsError(f"{name} contains NaN or Inf")
        matrix = torch.addr(second_moment, centre, centre, beta=scale, alpha=-1.0)
        roots, eigen, weights = _spectrum(
            matrix,
            "population covariance seen through R S R",
            check_input=False,
            eigensolver=solver,
        )
        ctx.save_for_backward(weights, factor, centre, *eigen.tensors)
        ctx.coef = coef
        ctx.solver = eigen.solver
        return roots.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        weights, factor, centre, *tensors = ctx.saved_tensors
        rows = torch.cat([factor, centre[None, :]])
        applied = apply_spectral(ctx.solver, tuple(tensors), rows, weights)
        grad_factor = grad_centre = None
        if ctx.needs_input_grad[2]:
            grad_factor = (2.0 * ctx.coef) * grad_output * applied[:-1]
        if ctx.needs_input_grad[4]:
            grad_centre = -2.0 * grad_output * applied[-1]
        return None, None, grad_factor, None, grad_centre, None


def trace_sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Return tr(M^{1/2}) of a symmetric PSD float64 matrix, differentiably.

    Round-off eigenvalues count as zero in the value. The gradient is
    Q diag(1 / (2 sqrt(max(l, floor)))) Q^T, with the floor set by EIGEN_FLOOR_REL.
    Raises StatisticsError on NaN, Inf, an indefinite or an all-zero matrix.
    """
    return _TraceSqrtPSD.apply(matrix)


def trace_sqrt_lowrank(
    second_moment: torch.Tensor,
    factor: torch.Tensor,
    coef: float,
    centre: torch.Tensor,
    scale: float = 1.0,
    eigensolver: str = "auto",
) -> torch.Tensor:
    """Return tr((s * second_moment - c c^T)^{1/2}) with gradients for Y and c.

    ``second_moment`` (d x d) is treated as a constant that already contains
    the batch factor Y (B x d), so that Y enters the matrix as coef * Y^T Y,
    as the estimators of ``fdpipe.stats`` build it; s is ``scale``. The gradient reaches Y through
    that term and c through -c c^T. Cost: one symmetric eigendecomposition
    plus O(B d^2). ``eigensolver`` is one of ``fdpipe.eigen.EIGENSOLVERS``.
    """
    solver = resolve_eigensolver(eigensolver, second_moment.shape[0], second_moment.device)
    return _TraceSqrtLowRank.apply(
        second_moment.detach(), float(scale), factor, float(coef), centre, solver
    )
