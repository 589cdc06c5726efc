"""Feature statistics: mergeable moments, reference Gaussians, EMA and queue.

All accumulation is float64. ``Moments`` merges shards with the parallel
(Chan et al.) update, which stays accurate when features share a large offset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdpipe.frechet import CovarianceFactor, StatisticsError, frechet_distance, psd_sqrt
from fdpipe.store import atomic_path

STATS_KEYS = ("mu", "sigma", "n")

log = logging.getLogger(__name__)


class Moments:
    """Count, mean and centred second moment of a stream of feature vectors."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: np.ndarray) -> None:
        """Add a batch of shape (n, dim)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {x.shape}")
        if x.shape[0] == 0:
            return
        if not np.all(np.isfinite(x)):
            raise StatisticsError(
                f"features contain NaN or Inf ({int(np.sum(~np.isfinite(x)))} values); "
                f"check the encoder output"
            )
        other = Moments(self.dim)
        other.count = x.shape[0]
        other.mean = x.mean(axis=0)
        centred = x - other.mean
        other.m2 = centred.T @ centred
        self.merge(other)

    def merge(self, other: "Moments") -> None:
        """Merge another accumulator into this one (parallel update formula)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / total)
        self.count = total

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Return m2 / (count - ddof), symmetrised."""
        if self.count - ddof <= 0:
            raise StatisticsError(
                f"need more than {ddof} feature vectors for a covariance, have {self.count}"
            )
        cov = self.m2 / (self.count - ddof)
        return 0.5 * (cov + cov.T)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Moments":
        mean = np.asarray(state["mean"], dtype=np.float64)
        out = cls(mean.shape[0])
        out.count = int(state["count"])
        out.mean = mean
        out.m2 = np.asarray(state["m2"], dtype=np.float64)
        return out


@dataclass(frozen=True)
class GaussianStats:
    """Mean, covariance and sample count of a feature set, with provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @cached_property
    def sqrt_sigma(self) -> np.ndarray:
        """PSD square root of sigma, computed once per object."""
        return psd_sqrt(self.sigma, name=self.attrs.get("space", "reference"))

    @classmethod
    def from_features(cls, features: np.ndarray, **attrs: Any) -> "GaussianStats":
        moments = Moments(features.shape[1])
        moments.update(features)
        return cls.from_moments(moments, **attrs)

    @classmethod
    def from_moments(cls, moments: Moments, **attrs: Any) -> "GaussianStats":
        return cls(moments.mean.copy(), moments.covariance(), moments.count, dict(attrs))

    @cached_property
    def factor(self) -> CovarianceFactor:
        """Cholesky factor of sigma for the FD's trace term, computed once per object."""
        return CovarianceFactor.from_covariance(self.sigma, name=self.attrs.get("space", "reference"))

    def frechet_distance_to(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """Return FD(N(mu, sigma), self) using the cached factor of self.sigma."""
        return frechet_distance(
            mu1=mu, sigma1=sigma, mu2=self.mu, sigma2=self.sigma, factor2=self.factor
        )

    def save(self, path: str | Path) -> None:
        """Write an .npz with mu, sigma, n, the cached root and JSON attributes."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    mu=self.mu,
                    sigma=self.sigma,
                    n=np.int64(self.n),
                    sqrt_sigma=self.sqrt_sigma,
                    attrs=np.array(json.dumps(self.attrs, sort_keys=True)),
                )

    @classmethod
    def load(
        cls, path: str | Path, *, expect_dim: int | None = None, expect_space: str | None = None
    ) -> "GaussianStats":
        """Read statistics written by ``save`` (or an ADM-style npz with mu/sigma)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"statistics file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise StatisticsError(
                    f"{path}: missing key(s) {missing}; a statistics file needs 'mu' and "
                    f"'sigma' (found {sorted(data.files)})"
                )
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
            n = int(data["n"]) if "n" in data.files else -1
            attrs = json.loads(str(data["attrs"])) if "attrs" in data.files else {}
            root = np.asarray(data["sqrt_sigma"], dtype=np.float64) if "sqrt_sigma" in data.files else None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise StatisticsError(
                f"{path}: mean has shape {mu.shape} and covariance {sigma.shape}; "
                f"expected (d,) and (d, d)"
            )
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise StatisticsError(f"{path}: mean or covariance contains NaN or Inf")
        asymmetry = float(np.max(np.abs(sigma - sigma.T))) if sigma.size else 0.0
        if asymmetry > 1e-8 * max(float(np.max(np.abs(sigma))), np.finfo(np.float64).tiny):
            raise StatisticsError(
                f"{path}: covariance 'sigma' is not symmetric (max |S - S^T| = "
                f"{asymmetry:.3g}); the file is corrupt or not a covariance, recompute it"
            )
        if expect_dim is not None and mu.shape[0] != expect_dim:
            raise StatisticsError(
                f"{path}: statistics have dimension {mu.shape[0]} but the space "
                f"'{expect_space or '?'}' produces {expect_dim}-d features; recompute the "
                f"statistics with `fdpipe stats` for this space"
            )
        if expect_space is not None and attrs.get("space") not in (None, expect_space):
            raise StatisticsError(
                f"{path}: statistics were computed in space '{attrs['space']}', "
                f"not '{expect_space}'"
            )
        out = cls(mu, sigma, n, attrs)
        if root is not None and _root_matches(root, sigma):
            out.__dict__["sqrt_sigma"] = root
        elif root is not None:
            log.warning("%s: stored sqrt_sigma does not match sigma; recomputing it", path)
        return out


def _root_matches(root: np.ndarray, sigma: np.ndarray) -> bool:
    """Check in O(d^2) that a stored root R fits sigma: tr(R R) = tr(sigma)."""
    if root.shape != sigma.shape or not np.all(np.isfinite(root)):
        return False
    trace = float(np.trace(sigma))
    return abs(float(np.sum(root * root.T)) - trace) <= 1e-8 * max(abs(trace), 1e-300)


@dataclass(frozen=True)
class ProjectedPopulation:
    """Population statistics seen through a reference root R.

    R S R = scale * second_moment - centre centre^T, where S is the
    population covariance. ``second_moment`` is detached and already
    contains the current batch, which enters R S R as coef * factor^T factor;
    ``factor`` and ``centre`` carry the gradient to the batch, as do
    ``mean`` and ``trace``.
    """

    mean: torch.Tensor  # [d] population mean
    trace: torch.Tensor  # [] tr(S)
    second_moment: torch.Tensor  # [d, d] detached, batch included
    factor: torch.Tensor  # [B, d] (x - shift) R
    coef: float
    centre: torch.Tensor  # [d] R (mean - shift)
    scale: float = 1.0


class _PendingState:
    """The projected second moment a batch leads to, kept from the loss to the update.

    ``projected_population`` computes it anyway; ``update`` with the same
    batch then copies it instead of repeating the two B x d x d products.
    The batch is compared by value, and a key of the estimator's settings
    and buffer versions catches state changed in between, so any other
    batch or state is recomputed.
    """

    def __init__(self):
        self.batch: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.key: tuple = ()

    def keep(self, batch: torch.Tensor, value: torch.Tensor, key: tuple) -> None:
        """Keep ``value`` for ``batch``; ``key`` identifies the estimator state it came from."""
        self.batch = batch.detach().clone()
        self.value = value
        self.key = key

    def take(self, batch: torch.Tensor, key: tuple) -> torch.Tensor | None:
        """Return the kept value if batch and state key match, else None; forget it."""
        hit = (
            self.batch is not None
            and self.key == key
            and self.batch.shape == batch.shape
            and self.batch.device == batch.device
            and bool(torch.equal(self.batch, batch))
        )
        value = self.value if hit else None
        self.batch = self.value = None
        self.key = ()
        return value


def _batch_float64(x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what}: expected features of shape (B, {dim}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: the batch is empty")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x.detach()).all()):
        raise StatisticsError(f"{what}: features contain NaN or Inf")
    return x


class EMAStatistics(torch.nn.Module):
    """Exponential moving average of the mean and second moment of features.

    ``population(x)`` mixes the detached EMA with the current batch, so the
    gradient flows through the batch only:
    mu = b mu_ema + (1 - b) mean(x), M2 = b M2_ema + (1 - b) z^T z / B and
    S = M2 - (mu - c)(mu - c)^T with z = x - c. The second moment is taken
    about ``shift`` c, the mean at ``fill`` time, so that a large common
    offset of the features does not cancel away the covariance.
    ``update(x)`` folds the detached batch into the EMA after the optimiser
    step.

    With ``projection`` R (the reference root), the module also keeps
    R M2_ema R up to date with a rank-B update per step. Its
    ``projected_population`` returns R S R in factored form, so FD-loss needs
    no d x d x d product per step. With ``keep_second_moment=False`` (only
    allowed with a projection) the d x d ``m2`` is replaced by its diagonal,
    which saves its memory and update, and ``population`` is unavailable.
    """

    def __init__(
        self,
        dim: int,
        beta: float,
        projection: torch.Tensor | None = None,
        keep_second_moment: bool = True,
    ):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        if projection is None and not keep_second_moment:
            raise ValueError("keep_second_moment=False needs a projection")
        self.dim = int(dim)
        self.beta = float(beta)
        self.register_buffer("mu", torch.zeros(dim, dtype=torch.float64))
        if keep_second_moment:
            self.register_buffer("m2", torch.zeros(dim, dim, dtype=torch.float64))
        else:
            self.m2 = None
        self.register_buffer("m2_diagonal", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        if projection is not None:
            root = _check_projection(projection, dim)
            self.register_buffer("projection", root)
            self.register_buffer("projected_m2", torch.zeros_like(root))
        else:
            self.projection = None
        self._pending = _PendingState()

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending = _PendingState()
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def fill(self, features: torch.Tensor) -> None:
        """Initialise from features of samples of the generator being trained."""
        x = _batch_float64(features.detach(), self.dim, "EMA fill")
        self._pending = _PendingState()
        if x.shape[0] < 2:
            raise StatisticsError(f"EMA fill needs at least 2 feature vectors, got {x.shape[0]}")
        self.shift.copy_(x.mean(0))
        self.mu.copy_(self.shift)
        z = x - self.shift
        if self.m2 is not None:
            self.m2.copy_(z.T @ z / x.shape[0])
        self.m2_diagonal.copy_((z * z).mean(0))
        if self.projection is not None:
            y = z @ self.projection
            self.projected_m2.copy_(y.T @ y / x.shape[0])
        self.filled.fill_(True)

    def _check_filled(self) -> None:
        if not bool(self.filled):
            raise RuntimeError("EMA statistics used before fill(); initialise them first")

    def population(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean, covariance) of the EMA population with batch x mixed in."""
        self._check_filled()
        if self.m2 is None:
            raise RuntimeError(
                "population() needs the full second moment; construct EMAStatistics "
                "with keep_second_moment=True or use projected_population()"
            )
        x = _batch_float64(x, self.dim, "EMA population")
        b = self.beta
        z = x - self.shift
        mu = b * self.mu + (1.0 - b) * x.mean(0)
        m2 = b * self.m2 + (1.0 - b) * (z.T @ z) / x.shape[0]
        deviation = mu - self.shift
        return mu, m2 - torch.outer(deviation, deviation)

    def projected_population(self, x: torch.Tensor) -> ProjectedPopulation:
        """Return the population with batch x mixed in, seen through R; O(B d^2)."""
        self._check_filled()
        if self.projection is None:
            raise RuntimeError("projected_population needs EMAStatistics(..., projection=R)")
        x = _batch_float64(x, self.dim, "EMA population")
        b = self.beta
        batch = x.shape[0]
        z = x - self.shift
        mu = b * self.mu + (1.0 - b) * x.mean(0)
        deviation = mu - self.shift
        trace = (
            b * self.m2_diagonal.sum()
            + (1.0 - b) * (z * z).sum() / batch
            - deviation @ deviation
        )
        factor = z @ self.projection
        second_moment = self._next_projected_m2(factor.detach(), batch)
        self._pending.keep(x, second_moment, self._state_key())
        return ProjectedPopulation(
            mean=mu,
            trace=trace,
            second_moment=second_moment,
            factor=factor,
            coef=(1.0 - b) / batch,
            centre=deviation @ self.projection,
        )

    def _state_key(self) -> tuple:
        buffer = self.projected_m2
        return (
            self.beta,
            buffer.data_ptr(),
            buffer._version,
            self.shift._version,
            self.projection._version,
        )

    def _next_projected_m2(self, projected: torch.Tensor, batch: int) -> torch.Tensor:
        """Return b R M2 R + (1 - b) Y^T Y / B for the projected, shifted batch Y."""
        b = self.beta
        return torch.addmm(self.projected_m2, projected.T, projected, beta=b, alpha=(1.0 - b) / batch)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the detached batch into the EMA in O(B d^2), less if the loss saw x."""
        self._check_filled()
        x = _batch_float64(x.detach(), self.dim, "EMA update")
        b = self.beta
        batch = x.shape[0]
        z = x - self.shift
        pending = self._pending.take(x, self._state_key()) if self.projection is not None else None
        self.mu.mul_(b).add_(x.mean(0), alpha=1.0 - b)
        if self.m2 is not None:
            self.m2.mul_(b).addmm_(z.T, z, alpha=(1.0 - b) / batch)
        self.m2_diagonal.mul_(b).add_((z * z).mean(0), alpha=1.0 - b)
        if self.projection is not None:
            if pending is None:
                pending = self._next_projected_m2(z @ self.projection, batch)
            self.projected_m2.copy_(pending)


def _check_projection(projection: torch.Tensor, dim: int) -> torch.Tensor:
    root = torch.as_tensor(projection).detach().to(torch.float64)
    if root.shape != (dim, dim):
        raise ValueError(f"projection must have shape ({dim}, {dim}), got {tuple(root.shape)}")
    return root


class QueueStatistics(torch.nn.Module):
    """FIFO of the last ``size`` feature vectors with running float64 sums.

    ``population(x)`` replaces the oldest B entries by the batch x, so the
    gradient flows through the batch only; ``update(x)`` then enqueues x.
    The sums are of z = x - c and z z^T, with ``shift`` c the mean at
    ``fill`` time, and are recomputed from the stored features once per pass
    through the queue so that round-off cannot accumulate. Size 0 means batch
    statistics only.

    With ``projection`` R the module also keeps R (sum z z^T) R, updated in
    O(B d^2) per step, for ``projected_population``. With
    ``keep_second_moment=False`` (only allowed with a projection) the d x d
    sum of z z^T is replaced by its diagonal, and ``population`` is
    unavailable.
    """

    def __init__(
        self,
        dim: int,
        size: int,
        projection: torch.Tensor | None = None,
        keep_second_moment: bool = True,
    ):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        if projection is None and not keep_second_moment:
            raise ValueError("keep_second_moment=False needs a projection")
        self.dim = int(dim)
        self.size = int(size)
        self.register_buffer("buffer", torch.zeros(self.size, dim, dtype=torch.float64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("shift", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sum1", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sum_squares", torch.zeros(dim, dtype=torch.float64))
        if keep_second_moment:
            self.register_buffer("sum2", torch.zeros(dim, dim, dtype=torch.float64))
        else:
            self.sum2 = None
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        if projection is not None:
            root = _check_projection(projection, dim)
            self.register_buffer("projection", root)
            self.register_buffer("projected_sum2", torch.zeros_like(root))
        else:
            self.projection = None
        self._pending = _PendingState()

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending = _PendingState()
        super()._load_from_state_dict(*args, **kwargs)

    def _slots(self, b: int) -> torch.Tensor:
        return (self.pointer + torch.arange(b, device=self.buffer.device)) % self.size

    @torch.no_grad()
    def fill(self, features: torch.Tensor) -> None:
        """Fill the queue with the last ``size`` rows of features."""
        x = _batch_float64(features.detach(), self.dim, "queue fill")
        self._pending = _PendingState()
        if self.size == 0:
            self.filled.fill_(True)
            return
        if x.shape[0] < self.size:
            raise ValueError(
                f"queue of size {self.size} needs at least {self.size} features to fill, "
                f"got {x.shape[0]}"
            )
        self.buffer.copy_(x[-self.size :])
        self.shift.copy_(self.buffer.mean(0))
        self.pointer.zero_()
        self._recompute()
        self.filled.fill_(True)

    @torch.no_grad()
    def _recompute(self) -> None:
        z = self.buffer - self.shift
        self.sum1.copy_(z.sum(0))
        self.sum_squares.copy_((z * z).sum(0))
        sum2 = z.T @ z
        if self.sum2 is not None:
            self.sum2.copy_(sum2)
        if self.projection is not None:
            self.projected_sum2.copy_(self.projection @ sum2 @ self.projection)

    def _check_ready(self, b: int) -> None:
        if not bool(self.filled):
            raise RuntimeError("queue statistics used before fill(); initialise them first")
        if b > self.size > 0:
            raise ValueError(f"batch of {b} is larger than the queue ({self.size})")

    def population(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean, covariance) of the queue with its oldest B entries replaced by x."""
        if self.sum2 is None:
            raise RuntimeError(
                "population() needs the full second moment; construct QueueStatistics "
                "with keep_second_moment=True or use projected_population()"
            )
        x = _batch_float64(x, self.dim, "queue population")
        b = x.shape[0]
        self._check_ready(b)
        if self.size == 0:
            mu = x.mean(0)
            centred = x - mu
            return mu, centred.T @ centred / b
        z = x - self.shift
        old = self.buffer[self._slots(b)] - self.shift
        n = self.size
        deviation = (self.sum1 - old.sum(0) + z.sum(0)) / n
        m2 = (self.sum2 - old.T @ old + z.T @ z) / n
        return self.shift + deviation, m2 - torch.outer(deviation, deviation)

    def projected_population(self, x: torch.Tensor) -> ProjectedPopulation:
        """Return the population with batch x swapped in, seen through R; O(B d^2)."""
        if self.projection is None:
            raise RuntimeError("projected_population needs QueueStatistics(..., projection=R)")
        x = _batch_float64(x, self.dim, "queue population")
        b = x.shape[0]
        self._check_ready(b)
        root = self.projection
        if self.size == 0:
            mean = x.mean(0)
            centred = x - mean
            factor = centred @ root
            return ProjectedPopulation(
                mean=mean,
                trace=(centred * centred).sum() / b,
                second_moment=factor.detach().T @ factor.detach(),
                factor=factor,
                coef=1.0 / b,
                centre=torch.zeros_like(mean),
                scale=1.0 / b,
            )
        z = x - self.shift
        old = self.buffer[self._slots(b)] - self.shift
        n = self.size
        deviation = (self.sum1 - old.sum(0) + z.sum(0)) / n
        total_sq = self.sum_squares.sum() - (old * old).sum() + (z * z).sum()
        factor = z @ root
        second_moment = self._next_projected_sum2(old @ root, factor.detach())
        self._pending.keep(x, second_moment, self._state_key())
        return ProjectedPopulation(
            mean=self.shift + deviation,
            trace=total_sq / n - deviation @ deviation,
            second_moment=second_moment,
            factor=factor,
            coef=1.0 / n,
            centre=deviation @ root,
            scale=1.0 / n,
        )

    def _state_key(self) -> tuple:
        buffer = self.projected_sum2
        return (
            int(self.pointer),
            buffer.data_ptr(),
            buffer._version,
            self.buffer._version,
            self.shift._version,
            self.projection._version,
        )

    def _next_projected_sum2(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Return R (sum z z^T) R with the projected rows ``old`` swapped for ``new``."""
        swapped = torch.addmm(self.projected_sum2, old.T, old, alpha=-1.0)
        return swapped.addmm_(new.T, new)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Enqueue the detached batch in place of the oldest entries; O(B d^2)."""
        if self.size == 0:
            return
        x = _batch_float64(x.detach(), self.dim, "queue update")
        self._check_ready(x.shape[0])
        pending = self._pending.take(x, self._state_key()) if self.projection is not None else None
        slots = self._slots(x.shape[0])
        z = x - self.shift
        old = self.buffer[slots] - self.shift
        self.sum1.add_(z.sum(0) - old.sum(0))
        self.sum_squares.add_((z * z).sum(0) - (old * old).sum(0))
        if self.sum2 is not None:
            self.sum2.addmm_(z.T, z).addmm_(old.T, old, alpha=-1.0)
        self.buffer[slots] = x
        new_pointer = int(self.pointer) + x.shape[0]
        if new_pointer >= self.size:
            self._recompute()
        elif self.projection is not None:
            if pending is None:
                pending = self._next_projected_sum2(old @ self.projection, z @ self.projection)
            self.projected_sum2.copy_(pending)
        self.pointer.fill_(new_pointer % self.size)
