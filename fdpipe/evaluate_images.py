"""``fdpipe evaluate --images``: FD, FDr and FDr^k of a folder or .npz of samples.

Runs without Snakemake: the samples are streamed through every requested
space once, their float64 statistics are compared with the given reference
statistics, and each FD is divided by that space's normaliser.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fdpipe.data.imageset import open_image_set
from fdpipe.evaluate import inception_score, read_json, write_json
from fdpipe.spaces import FeatureSpace
from fdpipe.stats import GaussianStats

log = logging.getLogger(__name__)


def reference_paths(args: argparse.Namespace, names: list[str]) -> dict[str, Path]:
    """Statistics file per space from --stats SPACE=FILE pairs or --stats-dir."""
    paths: dict[str, Path] = {}
    for item in args.stats or []:
        space, sep, file = item.partition("=")
        if not sep:
            raise ValueError(f"--stats {item!r}: with --images give SPACE=FILE pairs")
        paths[space] = Path(file)
    if args.stats_dir:
        for name in names:
            paths.setdefault(name, Path(args.stats_dir) / f"{name}.npz")
    missing = [n for n in names if n not in paths]
    if missing:
        raise ValueError(f"no reference statistics for space(s) {missing}; pass --stats-dir "
                         f"or --stats SPACE=FILE")
    return {n: paths[n] for n in names}


def load_reference(path: Path, space: FeatureSpace) -> GaussianStats:
    """Load statistics and check that they were made with this space's network."""
    ref = GaussianStats.load(path, expect_dim=space.dim, expect_space=space.spec.name)
    own = space.attributes()
    stored = ref.attrs.get("weights_sha256")
    if stored and stored != own["weights_sha256"]:
        raise ValueError(f"{path} was computed with weights_sha256 = {stored!r}, but space "
                         f"'{space.spec.name}' has {own['weights_sha256']!r}; recompute the "
                         f"statistics with these weights")
    if not ref.attrs:
        log.warning("%s has no provenance (an ADM reference batch?); its mu/sigma are used as "
                    "they are for space '%s'", path, space.spec.name)
    return ref


def normalisers(args: argparse.Namespace, config: dict[str, Any],
                names: list[str]) -> tuple[dict[str, float], str]:
    """FDr normalisers and their source: --normaliser, published table or --valfd JSON."""
    evaluation = config.get("evaluation", {})
    mode = args.normalisers or evaluation.get("normalisers", "computed")
    values: dict[str, float] = {}
    if mode == "published":
        values = {k: float(v) for k, v in evaluation.get("published_normalisers", {}).items()}
        source = "published (config evaluation.published_normalisers)"
    elif args.valfd:
        values = {k: float(v["fd"]) for k, v in read_json(args.valfd).items()}
        source = f"computed ({args.valfd})"
    else:
        source = "none (pass --valfd, --normalisers published or --normaliser)"
    for item in args.normaliser:
        space, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--normaliser {item!r}: use SPACE=FD")
        values[space] = float(value)
        source = "command line (--normaliser) and " + source
    bad = {n: values[n] for n in names if n in values and not values[n] > 0}
    if bad:
        raise ValueError(f"FDr normalisers must be positive; got {bad}")
    return {n: values[n] for n in names if n in values}, source


def evaluate_images(args: argparse.Namespace, spaces: dict[str, FeatureSpace],
                    config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a sample source in every space, print the table and return the results."""
    from fdpipe.features import stats_of_image_set

    names = list(spaces)
    refs = {n: load_reference(p, spaces[n]) for n, p in reference_paths(args, names).items()}
    norms, source = normalisers(args, config or {}, names)
    image_set = open_image_set(args.images, resolution=args.resolution,
                               skip_bad=args.skip_bad_images)
    stats, logits = stats_of_image_set(spaces, image_set, batch_size=args.batch_size,
                                       device=args.device_obj, bf16=args.bf16)
    rows = {}
    for name in names:
        fd = refs[name].frechet_distance_to(stats[name].mu, stats[name].sigma)
        row = {"fd": fd, "n": stats[name].n, "reference_n": refs[name].n}
        if name in norms:
            row.update(normaliser=norms[name], fdr=fd / norms[name])
        if name in logits:
            row["inception_score"], row["inception_score_std"] = inception_score(logits[name])
        rows[name] = row
    with_fdr = [n for n in names if "fdr" in rows[n]]
    result: dict[str, Any] = {"images": str(args.images), "spaces": rows,
                              "normalisers": source}
    if with_fdr and len(with_fdr) == len(names):
        result["fdr_k"] = float(np.mean([rows[n]["fdr"] for n in names]))
        result["k"] = len(names)
    bad = image_set.bad.files if image_set.bad is not None else []
    result["bad_images"] = len(bad)
    print(format_table(result))
    if args.out:
        write_json(args.out, result)
        if image_set.bad is not None:
            image_set.bad.write_report(args.out)
    elif bad:
        for entry in bad:
            log.warning("skipped %s: %s", entry["file"], entry["reason"])
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'space':<16} {'n':>7} {'FD':>12} {'FDr':>9}"]
    for name, row in result["spaces"].items():
        fdr = f"{row['fdr']:9.4f}" if "fdr" in row else f"{'-':>9}"
        lines.append(f"{name:<16} {row['n']:>7d} {row['fd']:12.5g} {fdr}")
        if "inception_score" in row:
            lines.append(f"{'':<16} Inception Score {row['inception_score']:.4g} "
                         f"+- {row['inception_score_std']:.3g}")
    if "fdr_k" in result:
        lines.append(f"FDr^{result['k']} = {result['fdr_k']:.4f}  (normalisers: "
                     f"{result['normalisers']})")
    else:
        lines.append(f"FDr^k not computed: normalisers {result['normalisers']}")
    if result["bad_images"]:
        lines.append(f"skipped {result['bad_images']} bad image(s)")
    return "\n".join(lines)
