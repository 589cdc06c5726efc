"""Symmetric eigendecompositions for the differentiable trace term of FD-loss.

A training step needs all eigenvalues of one d x d symmetric matrix M and,
in the backward pass, M's spectral function Q diag(s) Q^T applied to the
B + 1 rows of the batch factor. Two exact float64 solvers give that:

- ``torch``: ``torch.linalg.eigh``, which forms the d x d eigenvector matrix
  Q. On the CPU it calls LAPACK's divide-and-conquer driver in the LAPACK
  that torch links (MKL in the x86 wheels); on CUDA it calls cuSOLVER.
- ``tridiagonal``: CPU only. LAPACK ``dsytrd`` reduces M to a tridiagonal
  T = H^T M H, ``dstemr`` (the MRRR algorithm) returns T's eigenvalues and
  eigenvectors Z in O(d^2) operations, and the backward pass applies
  H Z diag(s) Z^T H^T to the B + 1 rows without ever forming Q = H Z. That
  skips the d x d x d back-transformation that ``eigh`` spends on Q.
  Both LAPACK calls go through scipy.

Which one is faster depends on the CPU and its LAPACK: on the AMD EPYC
recorded in benchmarks/BENCHMARKS.md the tridiagonal path (OpenBLAS) took
1.4 s against 2.1 s for ``eigh`` (MKL) at d = 2048, one thread. ``"auto"`` therefore times both once
per dimension and process on a random matrix of that size and keeps the
faster (see ``choose_eigensolver``). ``FDLoss`` stores the choice in its
state, so a resumed run uses the same solver as the run it continues.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

EIGENSOLVERS = ("auto", "torch", "tridiagonal")

# Below this dimension "auto" takes torch.linalg.eigh without timing: the
# decomposition costs milliseconds and the tridiagonal path's per-call
# overhead (scipy wrappers, two ormqr calls) would dominate.
AUTO_MIN_DIM = 512


class EigenError(ValueError):
    """Raised when a symmetric eigendecomposition fails or finds NaN or Inf."""


@dataclass
class SymmetricEigen:
    """Eigenvalues of a symmetric matrix and the means to apply its eigenvectors.

    ``tensors`` are what the backward pass needs: (Q,) for ``torch``;
    (packed reflectors, tau, Z) for ``tridiagonal``.
    """

    solver: str
    values: torch.Tensor  # ascending
    tensors: tuple[torch.Tensor, ...]

    def apply(self, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Return rows @ Q diag(scale) Q^T for rows of shape (n, d)."""
        return apply_spectral(self.solver, self.tensors, rows, scale)


def apply_spectral(
    solver: str, tensors: tuple[torch.Tensor, ...], rows: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Return rows @ Q diag(scale) Q^T from the tensors of a ``SymmetricEigen``."""
    if solver == "torch":
        (q,) = tensors
        return ((rows @ q) * scale) @ q.T
    reflectors, tau, z = tensors
    columns = rows.T.contiguous()
    if reflectors.numel():
        columns[1:] = torch.ormqr(reflectors, tau, columns[1:], left=True, transpose=True)
    columns = z @ ((z.T @ columns) * scale[:, None])
    if reflectors.numel():
        columns[1:] = torch.ormqr(reflectors, tau, columns[1:], left=True, transpose=False)
    return columns.T


def symmetric_eigen(matrix: torch.Tensor, solver: str, what: str) -> SymmetricEigen:
    """Decompose a symmetric float64 matrix; ``tridiagonal`` overwrites ``matrix``.

    The matrix must be symmetric: each solver reads one triangle only
    (``torch`` the lower one, ``tridiagonal`` the upper). Raises EigenError, naming ``what``, when
    LAPACK fails or the matrix contains NaN or Inf.
    """
    if solver not in EIGENSOLVERS or solver == "auto":
        raise ValueError(
            f"unknown eigensolver '{solver}'; use 'torch' or 'tridiagonal' "
            f"(resolve 'auto' with resolve_eigensolver first)"
        )
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise EigenError(f"{what}: expected a square matrix, got shape {tuple(matrix.shape)}")
    matrix = matrix.detach()
    if matrix.shape[0] == 0:
        empty = matrix.new_empty(0)
        if solver == "torch":
            return SymmetricEigen("torch", empty, (matrix.new_empty(0, 0),))
        return SymmetricEigen(
            "tridiagonal", empty, (matrix.new_empty(0, 0), empty, matrix.new_empty(0, 0))
        )
    if solver == "torch":
        try:
            values, q = torch.linalg.eigh(matrix)
        except torch.linalg.LinAlgError as err:
            if not bool(torch.isfinite(matrix).all()):
                raise EigenError(f"{what} contains NaN or Inf") from err
            raise EigenError(f"{what}: eigendecomposition failed: {err}") from err
        if not bool(torch.isfinite(values).all()):
            raise EigenError(f"{what} contains NaN or Inf")
        return SymmetricEigen("torch", values, (q,))
    return _tridiagonal_eigen(matrix, what)


@functools.lru_cache(maxsize=None)
def _sytrd_lwork(dim: int) -> int:
    from scipy.linalg import lapack

    work, info = lapack.dsytrd_lwork(dim, lower=1)
    if info != 0:
        raise EigenError(f"LAPACK dsytrd workspace query failed for d = {dim} (info {info})")
    return max(1, int(work))


def _tridiagonal_eigen(matrix: torch.Tensor, what: str) -> SymmetricEigen:
    from scipy.linalg import lapack

    if matrix.device.type != "cpu" or matrix.dtype != torch.float64:
        raise ValueError(
            f"the tridiagonal eigensolver runs on CPU float64 matrices, got "
            f"{matrix.dtype} on {matrix.device}; use eigensolver 'torch'"
        )
    d = matrix.shape[0]
    if not matrix.is_contiguous():
        matrix = matrix.contiguous()
    # A C-ordered symmetric matrix read as Fortran-ordered is its transpose,
    # which is the same matrix: dsytrd then works in place without a copy.
    packed, diagonal, off_diagonal, tau, info = lapack.dsytrd(
        matrix.numpy().T, lower=1, lwork=_sytrd_lwork(d), overwrite_a=1
    )
    if info != 0:
        raise EigenError(f"{what}: LAPACK dsytrd failed (info {info})")
    if not (np.isfinite(diagonal).all() and np.isfinite(off_diagonal).all()):
        raise EigenError(f"{what} contains NaN or Inf")
    count, values, z, info = lapack.dstemr(
        diagonal.copy(), np.append(off_diagonal, 0.0), 0, 0.0, 0.0, 0, 0, compute_v=1
    )
    if info != 0 or count != d:
        # MRRR can fail to converge on rare spectra; the dense solver of the
        # tridiagonal matrix is slower but always converges.
        log.warning(
            "%s: LAPACK dstemr returned info %d (%d of %d eigenvalues); "
            "decomposing the tridiagonal matrix densely instead", what, info, count, d,
        )
        tridiagonal = torch.diag(torch.from_numpy(diagonal))
        off = torch.from_numpy(off_diagonal)
        tridiagonal += torch.diag(off, -1) + torch.diag(off, 1)
        values_t, z_t = torch.linalg.eigh(tridiagonal)
    else:
        values_t, z_t = torch.from_numpy(values), torch.from_numpy(z)
    reflectors = torch.from_numpy(packed)[1:, :-1]
    return SymmetricEigen(
        "tridiagonal", values_t, (reflectors, torch.from_numpy(tau), z_t)
    )


def resolve_eigensolver(solver: str, dim: int, device: torch.device | str) -> str:
    """Return the concrete solver ``torch`` or ``tridiagonal`` for a request."""
    if solver not in EIGENSOLVERS:
        raise ValueError(f"unknown eigensolver '{solver}'; use one of {list(EIGENSOLVERS)}")
    device = torch.device(device)
    if solver == "tridiagonal" and device.type != "cpu":
        raise ValueError(
            f"the tridiagonal eigensolver runs on the CPU only, not on {device}; "
            f"use 'torch' or 'auto'"
        )
    if solver != "auto":
        return solver
    if device.type != "cpu" or dim < AUTO_MIN_DIM:
        return "torch"
    return choose_eigensolver(dim)


@functools.lru_cache(maxsize=None)
def choose_eigensolver(dim: int) -> str:
    """Time both CPU solvers once at dimension ``dim`` and return the faster.

    The test matrix is a Wishart matrix with 2 d degrees of freedom; the
    backward pass's application to 257 rows is part of each timing. Takes
    a few seconds at d = 2048, once per dimension and process.
    """
    generator = torch.Generator().manual_seed(dim)
    x = torch.randn(2 * dim, dim, generator=generator, dtype=torch.float64)
    matrix = x.T @ x / (2 * dim)
    rows = x[:257]
    scale = torch.ones(dim, dtype=torch.float64)
    seconds = {}
    for solver in ("torch", "tridiagonal"):
        start = time.perf_counter()
        symmetric_eigen(matrix.clone(), solver, "timing matrix").apply(rows, scale)
        seconds[solver] = time.perf_counter() - start
    choice = min(seconds, key=seconds.get)
    log.info(
        "eigensolver for d = %d: %s (torch eigh %.2f s, tridiagonal %.2f s in one timed call)",
        dim, choice, seconds["torch"], seconds["tridiagonal"],
    )
    return choice
