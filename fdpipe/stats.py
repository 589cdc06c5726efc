"""Feature statistics: mergeable moments, reference Gaussians, EMA and queue.

All accumulation is float64. ``Moments`` merges shards with the parallel
(Chan et al.) update, which stays accurate when features share a large offset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdpipe.frechet import StatisticsError, frechet_distance, psd_sqrt
from fdpipe.store import atomic_path

STATS_KEYS = ("mu", "sigma", "n")


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

    def frechet_distance_to(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """Return FD(N(mu, sigma), self) using the cached root of self.sigma."""
        return frechet_distance(
            mu1=mu, sigma1=sigma, mu2=self.mu, sigma2=self.sigma, sqrt_sigma2=self.sqrt_sigma
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
        if root is not None and root.shape == sigma.shape:
            out.__dict__["sqrt_sigma"] = root
        return out


class EMAStatistics(torch.nn.Module):
    """Exponential moving average of the mean and raw second moment.

    ``population(x)`` mixes the detached EMA with the current batch, so the
    gradient flows through the batch only:
    mu = b mu_ema + (1 - b) mean(x), M2 = b M2_ema + (1 - b) x^T x / B.
    ``update(x)`` folds the detached batch into the EMA after the step.
    """

    def __init__(self, dim: int, beta: float):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.register_buffer("mu", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    def fill(self, features: torch.Tensor) -> None:
        """Initialise from features of samples of the generator being trained."""
        x = features.detach().to(torch.float64)
        self.mu.copy_(x.mean(0))
        self.m2.copy_(x.T @ x / x.shape[0])
        self.filled.fill_(True)

    def population(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean, covariance) of the EMA population with batch x mixed in."""
        if not bool(self.filled):
            raise RuntimeError("EMA statistics used before fill(); initialise them first")
        x = x.to(torch.float64)
        b = self.beta
        mu = b * self.mu + (1.0 - b) * x.mean(0)
        m2 = b * self.m2 + (1.0 - b) * (x.T @ x) / x.shape[0]
        sigma = m2 - torch.outer(mu, mu)
        return mu, sigma

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        b = self.beta
        self.mu.mul_(b).add_(x.mean(0), alpha=1.0 - b)
        self.m2.mul_(b).add_(x.T @ x / x.shape[0], alpha=1.0 - b)


class QueueStatistics(torch.nn.Module):
    """FIFO of the last ``size`` feature vectors with running float64 sums.

    ``population(x)`` replaces the oldest B entries by the batch x, so the
    gradient flows through the batch only; ``update(x)`` then enqueues x.
    Size 0 means batch statistics only.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = int(size)
        self.register_buffer("buffer", torch.zeros(self.size, dim, dtype=torch.float64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("sum1", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sum2", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    def _slots(self, b: int) -> torch.Tensor:
        return (self.pointer + torch.arange(b, device=self.buffer.device)) % self.size

    @torch.no_grad()
    def fill(self, features: torch.Tensor) -> None:
        if self.size == 0:
            self.filled.fill_(True)
            return
        x = features.detach().to(torch.float64)
        if x.shape[0] < self.size:
            raise ValueError(
                f"queue of size {self.size} needs at least {self.size} features to fill, "
                f"got {x.shape[0]}"
            )
        self.buffer.copy_(x[-self.size :])
        self.pointer.zero_()
        self._recompute()
        self.filled.fill_(True)

    @torch.no_grad()
    def _recompute(self) -> None:
        self.sum1.copy_(self.buffer.sum(0))
        self.sum2.copy_(self.buffer.T @ self.buffer)

    def population(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.filled):
            raise RuntimeError("queue statistics used before fill(); initialise them first")
        x = x.to(torch.float64)
        b = x.shape[0]
        if self.size == 0:
            mu = x.mean(0)
            centred = x - mu
            return mu, centred.T @ centred / b
        if b > self.size:
            raise ValueError(f"batch of {b} is larger than the queue ({self.size})")
        old = self.buffer[self._slots(b)]
        n = self.size
        mu = (self.sum1 - old.sum(0) + x.sum(0)) / n
        m2 = (self.sum2 - old.T @ old + x.T @ x) / n
        return mu, m2 - torch.outer(mu, mu)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if self.size == 0:
            return
        x = x.detach().to(torch.float64)
        slots = self._slots(x.shape[0])
        old = self.buffer[slots]
        self.sum1.add_(x.sum(0) - old.sum(0))
        self.sum2.add_(x.T @ x - old.T @ old)
        self.buffer[slots] = x
        new_pointer = int(self.pointer) + x.shape[0]
        # Refresh the running sums once per pass so round-off cannot accumulate.
        if new_pointer >= self.size:
            self._recompute()
        self.pointer.fill_(new_pointer % self.size)
