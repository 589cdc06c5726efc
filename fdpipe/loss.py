"""FD-loss: differentiable Frechet distance against fixed reference statistics.

Population statistics come from an EMA or a queue of generated features; the
gradient flows through the current batch only. With several spaces, each
space's FD is divided by its own detached value so that every space
contributes a gradient of unit scale, then the spaces are weighted and summed.

Per step and space, ``FDLoss`` costs one symmetric eigendecomposition of a
d x d matrix plus O(B d^2): the estimators keep R M2 R (R = reference root)
up to date after each step, so no d x d x d product of detached state is
recomputed.
"""

from __future__ import annotations

import logging

import torch

from fdpipe.eigen import EIGENSOLVERS, resolve_eigensolver
from fdpipe.frechet import (
    EIGEN_FLOOR_REL,
    StatisticsError,
    trace_sqrt_lowrank,
    trace_sqrt_psd,
)
from fdpipe.stats import EMAStatistics, GaussianStats, ProjectedPopulation, QueueStatistics

log = logging.getLogger(__name__)

__all__ = [
    "EIGEN_FLOOR_REL",
    "FDLoss",
    "ReferenceTensors",
    "differentiable_fd",
    "projected_fd",
]


class ReferenceTensors(torch.nn.Module):
    """Reference mean, trace and PSD root of the covariance as float64 buffers."""

    def __init__(self, ref: GaussianStats):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(ref.mu, dtype=torch.float64))
        self.register_buffer("sqrt_sigma", torch.as_tensor(ref.sqrt_sigma, dtype=torch.float64))
        self.register_buffer(
            "trace_sigma", torch.as_tensor(float(ref.sigma.trace()), dtype=torch.float64)
        )


def _check_fd(fd: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(fd.detach())):
        raise StatisticsError(
            "Frechet distance is not finite; the population statistics contain NaN or Inf"
        )
    return fd


def differentiable_fd(
    mu: torch.Tensor, sigma: torch.Tensor, ref: ReferenceTensors
) -> torch.Tensor:
    """Return FD(N(mu, sigma), reference) as a differentiable float64 scalar.

    Forms R sigma R, so forward and backward each cost O(d^3) products on top
    of the eigendecomposition; ``projected_fd`` avoids them. Raises
    StatisticsError when the statistics are non-finite, indefinite or zero.
    """
    mu = mu.to(torch.float64)
    sigma = sigma.to(torch.float64)
    diff = mu - ref.mu
    root = ref.sqrt_sigma
    trace_sqrt = trace_sqrt_psd(root @ sigma @ root)
    fd = diff @ diff + torch.diagonal(sigma).sum() + ref.trace_sigma - 2.0 * trace_sqrt
    return _check_fd(fd)


def projected_fd(
    population: ProjectedPopulation, ref: ReferenceTensors, *, eigensolver: str = "auto"
) -> torch.Tensor:
    """Return FD(population, reference) from statistics already seen through R.

    One eigendecomposition plus O(B d^2); gradients reach the batch through
    the population's factor, centre, mean and trace. ``eigensolver`` is one
    of ``fdpipe.eigen.EIGENSOLVERS``.
    """
    diff = population.mean - ref.mu
    trace_sqrt = trace_sqrt_lowrank(
        population.second_moment,
        population.factor,
        population.coef,
        population.centre,
        scale=population.scale,
        eigensolver=eigensolver,
    )
    fd = diff @ diff + population.trace + ref.trace_sigma - 2.0 * trace_sqrt
    return _check_fd(fd)


class FDLoss(torch.nn.Module):
    """FD-loss over one or several representation spaces."""

    def __init__(
        self,
        references: dict[str, GaussianStats],
        *,
        method: str = "ema",
        beta: float = 0.999,
        queue_size: int = 0,
        weights: dict[str, float] | None = None,
        eps: float = 1e-8,
        eigensolver: str = "auto",
    ):
        super().__init__()
        if not references:
            raise ValueError("FDLoss needs at least one reference space")
        if eigensolver not in EIGENSOLVERS:
            raise ValueError(
                f"unknown eigensolver '{eigensolver}'; use one of {list(EIGENSOLVERS)}"
            )
        self.eigensolver = eigensolver
        # Concrete solver per space, chosen at the first forward pass or
        # restored from a checkpoint (see get_extra_state).
        self.solvers: dict[str, str] = {}
        unknown = sorted(set(weights or {}) - set(references))
        if unknown:
            raise ValueError(f"weights given for unknown space(s) {unknown}; spaces: {sorted(references)}")
        self.spaces = list(references)
        self.weights = {s: float((weights or {}).get(s, 1.0)) for s in self.spaces}
        self.eps = eps
        self.refs = torch.nn.ModuleDict({s: ReferenceTensors(r) for s, r in references.items()})
        estimators: dict[str, torch.nn.Module] = {}
        for space, ref in references.items():
            root = self.refs[space].sqrt_sigma
            if method == "ema":
                estimators[space] = EMAStatistics(
                    ref.dim, beta, projection=root, keep_second_moment=False
                )
            elif method == "queue":
                estimators[space] = QueueStatistics(
                    ref.dim, queue_size, projection=root, keep_second_moment=False
                )
            else:
                raise ValueError(f"unknown statistics method '{method}'; use 'ema' or 'queue'")
        self.estimators = torch.nn.ModuleDict(estimators)

    def get_extra_state(self) -> dict:
        return {"eigensolvers": dict(self.solvers)}

    def set_extra_state(self, state: dict) -> None:
        saved = dict((state or {}).get("eigensolvers", {}))
        if self.eigensolver == "auto":
            self.solvers = {s: v for s, v in saved.items() if s in self.spaces}

    def _solver(self, space: str, x: torch.Tensor) -> str:
        stale = (
            self.eigensolver == "auto"
            and self.solvers.get(space) == "tridiagonal"
            and x.device.type != "cpu"
        )
        if space not in self.solvers or stale:
            self.solvers[space] = resolve_eigensolver(self.eigensolver, x.shape[-1], x.device)
            log.info("space '%s': eigensolver %s", space, self.solvers[space])
        return self.solvers[space]

    def _features(self, features: dict[str, torch.Tensor], space: str) -> torch.Tensor:
        if space not in features:
            raise KeyError(f"no features for space '{space}'; got {sorted(features)}")
        return features[space]

    def fill(self, features: dict[str, torch.Tensor]) -> None:
        """Initialise every space's population from generated features."""
        for space in self.spaces:
            self.estimators[space].fill(self._features(features, space))

    def forward(
        self, features: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the weighted, self-normalised loss and the FD of each space."""
        total = torch.zeros((), dtype=torch.float64, device=next(iter(features.values())).device)
        values: dict[str, float] = {}
        for space in self.spaces:
            x = self._features(features, space)
            try:
                population = self.estimators[space].projected_population(x)
                fd = projected_fd(
                    population, self.refs[space], eigensolver=self._solver(space, x)
                )
            except StatisticsError as err:
                raise StatisticsError(f"space '{space}': {err}") from err
            values[space] = float(fd.detach())
            normalised = fd / (fd.detach() + self.eps) if len(self.spaces) > 1 else fd
            total = total + self.weights[space] * normalised
        return total, values

    @torch.no_grad()
    def update(self, features: dict[str, torch.Tensor]) -> None:
        """Fold the detached batch into each space's population; call after the step."""
        for space in self.spaces:
            self.estimators[space].update(self._features(features, space))
