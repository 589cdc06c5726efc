"""Reference statistics, FD, FDr, FDr^k and the Inception Score."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_softmax, logsumexp

from fdpipe.stats import GaussianStats, Moments
from fdpipe.store import atomic_path, open_features, read_dataset

log = logging.getLogger(__name__)


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    return json.loads(path.read_text())


def feature_file_moments(features_path: str | Path, chunk_rows: int = 65536
                         ) -> tuple[Moments, dict[str, Any]]:
    """Float64 moments of a feature file, read in chunks of ``chunk_rows`` rows."""
    path = Path(features_path)
    with open_features(path) as (fh, attrs):
        dataset = fh["features"]
        moments = Moments(dataset.shape[1])
        for start in range(0, dataset.shape[0], chunk_rows):
            block = dataset[start : start + chunk_rows]
            if not np.all(np.isfinite(block)):
                row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise ValueError(f"{path}: features of image {row} are NaN or Inf")
            moments.update(block)
    return moments, attrs


def stats_from_features(features_path: str | Path) -> GaussianStats:
    """Float64 mean and covariance (ddof = 1) of a feature file, with its provenance."""
    moments, attrs = feature_file_moments(features_path)
    keep = ("space", "family", "dim", "weights_sha256", "resolution", "image_file", "model",
            "input_size", "pooling")
    return GaussianStats.from_moments(
        moments, **{k: attrs[k] for k in keep if k in attrs}, features_file=str(features_path))


def write_stats(features_path: str | Path, out: str | Path) -> GaussianStats:
    stats = stats_from_features(features_path)
    stats.save(out)
    log.info("wrote statistics of %d %d-d features to %s", stats.n, stats.dim, out)
    return stats


def check_compatible(stats: GaussianStats, attrs: dict[str, Any], stats_path: str | Path,
                     features_path: str | Path) -> None:
    """Raise if the statistics belong to another space, network or resolution."""
    for key in ("space", "weights_sha256", "resolution"):
        a, b = stats.attrs.get(key), attrs.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"{stats_path} was computed with {key} = {a!r} but {features_path} has "
                f"{key} = {b!r}; recompute the statistics for this space"
            )


def frechet_distance_of_file(features_path: str | Path, stats_path: str | Path
                             ) -> tuple[float, int, dict[str, Any]]:
    """Return FD of a feature file against reference statistics, the count, attributes."""
    moments, attrs = feature_file_moments(features_path)
    ref = GaussianStats.load(stats_path, expect_dim=moments.dim,
                             expect_space=attrs.get("space"))
    check_compatible(ref, attrs, stats_path, features_path)
    fd = ref.frechet_distance_to(moments.mean, moments.covariance())
    return fd, int(moments.count), attrs


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Return mean and standard deviation of exp(E KL(p(y|x) || p(y))) over splits."""
    logp = log_softmax(logits.astype(np.float64), axis=1)
    scores = []
    for part in np.array_split(logp, splits):
        log_marginal = logsumexp(part, axis=0) - np.log(part.shape[0])
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def evaluate_variant(features_path: str | Path, stats_path: str | Path,
                     valfd_path: str | Path, space: str) -> dict[str, Any]:
    """FD, FDr and (for spaces with logits) the Inception Score of one variant."""
    fd, n, attrs = frechet_distance_of_file(features_path, stats_path)
    valfd = read_json(valfd_path)
    if space not in valfd:
        raise KeyError(f"{valfd_path} has no validation FD for space '{space}' "
                       f"(has {sorted(valfd)}); rebuild it with this space configured")
    normaliser = float(valfd[space]["fd"])
    result = {"space": space, "fd": fd, "n": n, "valfd": normaliser,
              "fdr": fd / normaliser if normaliser > 0 else float("nan"),
              "features_file": str(features_path), "stats_file": str(stats_path)}
    try:
        logits = read_dataset(features_path, "logits")
    except KeyError:
        logits = None
    if logits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(logits)
    log.info("%s: FD = %.5g over %d samples, FDr = %.4g", space, fd, n, result["fdr"])
    return result


def validation_fds(pairs: dict[str, tuple[str, str]],
                   published: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """FD of validation features against train statistics, per space (FDr normalisers).

    With ``published``, each space's normaliser ``fd`` is the published value
    and the computed one is kept as ``computed_fd`` for comparison.
    """
    out = {}
    for space, (features_path, stats_path) in pairs.items():
        fd, n, _ = frechet_distance_of_file(features_path, stats_path)
        if published is None and fd <= 0:
            raise ValueError(f"validation FD in space '{space}' is {fd}; FDr needs a positive "
                             f"normaliser (are the validation and train sets identical?)")
        entry = {"fd": fd, "n": n, "features_file": features_path, "stats_file": stats_path,
                 "source": "computed"}
        if published is not None:
            if space not in published:
                raise KeyError(f"no published normaliser for space '{space}'; add it under "
                               f"evaluation.published_normalisers")
            entry.update({"fd": float(published[space]), "computed_fd": fd,
                          "source": "published"})
        out[space] = entry
        log.info("validation FD in %s: %.5g over %d images (normaliser %.5g, %s)", space, fd,
                 n, entry["fd"], entry["source"])
    return out


def fdrk(fdr: dict[str, float], spaces: list[str]) -> float:
    """Arithmetic mean of FDr over the given spaces."""
    missing = [s for s in spaces if s not in fdr]
    if missing:
        raise KeyError(f"FDr^k needs spaces {missing}, which were not evaluated")
    return float(np.mean([fdr[s] for s in spaces]))
