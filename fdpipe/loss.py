"""FD-loss: differentiable Frechet distance against fixed reference statistics.

Population statistics come from an EMA or a queue of generated features; the
gradient flows through the current batch only. With several spaces, each
space's FD is divided by its own detached value so that every space
contributes a gradient of unit scale, then the spaces are weighted and summed.
"""

from __future__ import annotations

import torch

from fdpipe.stats import EMAStatistics, GaussianStats, QueueStatistics

# Eigenvalues of R S R below EIGEN_FLOOR_REL * max eigenvalue are clamped
# there; the gradient of sqrt is then bounded by 1 / (2 sqrt(floor)).
EIGEN_FLOOR_REL = 1e-10


class ReferenceTensors(torch.nn.Module):
    """Reference mean, trace and PSD root of the covariance as float64 buffers."""

    def __init__(self, ref: GaussianStats):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(ref.mu, dtype=torch.float64))
        self.register_buffer("sqrt_sigma", torch.as_tensor(ref.sqrt_sigma, dtype=torch.float64))
        self.register_buffer(
            "trace_sigma", torch.as_tensor(float(ref.sigma.trace()), dtype=torch.float64)
        )


def differentiable_fd(
    mu: torch.Tensor, sigma: torch.Tensor, ref: ReferenceTensors
) -> torch.Tensor:
    """Return FD(N(mu, sigma), reference) as a differentiable float64 scalar."""
    diff = mu - ref.mu
    root = ref.sqrt_sigma
    product = root @ sigma @ root
    product = 0.5 * (product + product.T)
    eigenvalues = torch.linalg.eigvalsh(product)
    floor = EIGEN_FLOOR_REL * eigenvalues.detach().abs().max().clamp_min(1e-300)
    trace_sqrt = eigenvalues.clamp_min(floor).sqrt().sum()
    fd = diff @ diff + torch.diagonal(sigma).sum() + ref.trace_sigma - 2.0 * trace_sqrt
    if not torch.isfinite(fd):
        raise FloatingPointError(
            "Frechet distance is not finite; the population statistics contain NaN or Inf"
        )
    return fd


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
    ):
        super().__init__()
        self.spaces = list(references)
        self.weights = {s: float((weights or {}).get(s, 1.0)) for s in self.spaces}
        self.eps = eps
        self.refs = torch.nn.ModuleDict({s: ReferenceTensors(r) for s, r in references.items()})
        if method == "ema":
            estimators = {s: EMAStatistics(r.dim, beta) for s, r in references.items()}
        elif method == "queue":
            estimators = {s: QueueStatistics(r.dim, queue_size) for s, r in references.items()}
        else:
            raise ValueError(f"unknown statistics method '{method}'; use 'ema' or 'queue'")
        self.estimators = torch.nn.ModuleDict(estimators)

    def fill(self, features: dict[str, torch.Tensor]) -> None:
        for space in self.spaces:
            self.estimators[space].fill(features[space])

    def forward(
        self, features: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the weighted, self-normalised loss and the FD of each space."""
        total = torch.zeros((), dtype=torch.float64, device=next(iter(features.values())).device)
        values: dict[str, float] = {}
        for space in self.spaces:
            mu, sigma = self.estimators[space].population(features[space])
            fd = differentiable_fd(mu, sigma, self.refs[space])
            values[space] = float(fd.detach())
            normalised = fd / (fd.detach() + self.eps) if len(self.spaces) > 1 else fd
            total = total + self.weights[space] * normalised
        return total, values

    @torch.no_grad()
    def update(self, features: dict[str, torch.Tensor]) -> None:
        for space in self.spaces:
            self.estimators[space].update(features[space])
