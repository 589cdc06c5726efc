"""Command line: one subcommand per pipeline stage.

Every Snakemake rule calls one of these; each also runs on its own. Settings
that change numbers arrive as a JSON object (``--spec``) so that Snakemake can
put them in ``params`` and rerun a job when they change.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("fdpipe")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _spec(text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--spec is not valid JSON: {err}") from err


# Families that check ``weights_sha256`` themselves (it may name a hub download).
_CHECKSUM_FAMILIES = ("inception", "timm")


def _space_from_spec(name: str, spec: dict[str, Any]):
    from fdpipe.spaces import SpaceSpec, build_space
    from fdpipe.spaces.weights import check_weights_file

    options = dict(spec.get("options", {}))
    sha256 = spec.get("weights_sha256")
    if sha256 and spec["family"] in _CHECKSUM_FAMILIES:
        options["weights_sha256"] = sha256
    elif sha256:
        if not spec.get("weights"):
            raise ValueError(f"spaces.{name}.weights_sha256 is set but spaces.{name}.weights "
                             f"is not; name the file to check")
        check_weights_file(name, spec["weights"], sha256)
    return build_space(SpaceSpec(name=name, family=spec["family"], options=options,
                                 weights=spec.get("weights")))


def _config_spaces(args) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Return the validated config (or {}) and the JSON specs of the requested spaces."""
    from fdpipe.config import load_config, space_weights_path

    if args.spec is not None:
        specs = args.spec
        config: dict[str, Any] = {}
    elif args.configfile:
        config = load_config(args.configfile)
        specs = {n: {**s, "weights": space_weights_path(n, s)}
                 for n, s in config["spaces"].items()}
    else:
        raise ValueError("name the spaces' settings with --configfile CONFIG or --spec JSON")
    names = args.spaces or list(specs)
    missing = [n for n in names if n not in specs]
    if missing:
        raise KeyError(f"space(s) {missing} are not configured (have {sorted(specs)})")
    return config, {n: specs[n] for n in names}


def cmd_fetch_data(args) -> None:
    from fdpipe.data import fashion_mnist

    root = fashion_mnist.fetch(None if args.root == "auto" else args.root)
    print(root)


def cmd_prepare(args) -> None:
    from fdpipe.data import fashion_mnist
    from fdpipe.data.images import prepare_split

    if args.dataset in ("imagefolder", "npz"):
        _prepare_manifest(args)
        return
    root = args.root
    if root == "auto":
        root = fashion_mnist.fetch()
    prepare_split(dataset=args.dataset, root=root, split=args.split, resolution=args.resolution,
                  out=args.out, subset=args.subset, seed=args.seed)


def _prepare_manifest(args) -> None:
    from fdpipe.data.folder import write_manifest, write_npz_manifest

    if args.root == "auto":
        raise ValueError(f"data.root (or data_root) must name the {args.dataset} data; 'auto' "
                         f"only locates Fashion-MNIST")
    source = Path(args.root) / (args.source or args.split)
    if args.subset:
        raise ValueError(f"--subset is not supported for {args.dataset} data; set "
                         f"data.{args.split}_subset to null")
    if args.dataset == "npz":
        write_npz_manifest(source, args.out)
    else:
        write_manifest(source, args.out, resolution=args.resolution,
                       skip_bad=args.skip_bad_images)


def cmd_train_encoder(args) -> None:
    import torch

    from fdpipe.spaces.training import EncoderTrainConfig, train_encoder
    from fdpipe.store import atomic_path, read_images

    spec = args.spec
    images, labels, _ = read_images(args.train)
    test_images, test_labels, _ = read_images(args.test)
    train_cfg = spec.get("train", {})
    if train_cfg.get("subset"):
        images, labels = images[: train_cfg["subset"]], labels[: train_cfg["subset"]]
    cfg = EncoderTrainConfig.from_dict({**train_cfg, "seed": args.seed})
    net, metrics = train_encoder(spec["family"], spec.get("options", {}), images, labels,
                                 test_images, test_labels, cfg)
    with atomic_path(args.out) as tmp:
        torch.save({"state_dict": net.state_dict(), "family": spec["family"],
                    "options": spec.get("options", {}), "metrics": metrics}, tmp)
    log.info("saved %s encoder to %s", args.space, args.out)


def cmd_extract(args) -> None:
    from fdpipe.features import extract_file

    space = _space_from_spec(args.space, args.spec)
    extract_file(space, args.images, args.out, batch_size=args.batch_size,
                 device=_device(args.device), skip_bad=args.skip_bad_images,
                 resolution=args.resolution)


def _image_set(args):
    from fdpipe.data.imageset import open_image_set

    return open_image_set(args.images, resolution=args.resolution, skip_bad=args.skip_bad_images)


def cmd_stats(args) -> None:
    from fdpipe.evaluate import write_stats

    if args.features:
        if args.images or not args.out:
            raise ValueError("use either --features F --out O, or --images SRC --out-dir D")
        write_stats(args.features, args.out)
        return
    if not args.images or not args.out_dir:
        raise ValueError("give --images (a folder, .npz, .h5 or manifest) and --out-dir, or "
                         "--features and --out")
    from fdpipe.features import stats_of_image_set

    _, specs = _config_spaces(args)
    spaces = {name: _space_from_spec(name, spec) for name, spec in specs.items()}
    image_set = _image_set(args)
    stats, _ = stats_of_image_set(spaces, image_set, batch_size=args.batch_size,
                                  device=_device(args.device), bf16=args.bf16)
    out_dir = Path(args.out_dir)
    for name, stat in stats.items():
        stat.save(out_dir / f"{name}.npz")
        log.info("wrote statistics of %d %d-d %s features to %s", stat.n, stat.dim, name,
                 out_dir / f"{name}.npz")
    if image_set.bad is not None:
        image_set.bad.write_report(out_dir / "stats")


def cmd_extract_shard(args) -> None:
    from fdpipe.shards import save_shard, shard_moments

    space = _space_from_spec(args.space, args.spec)
    moments, attrs = shard_moments(space, _image_set(args), args.shard, args.shards,
                                   batch_size=args.batch_size, device=_device(args.device),
                                   skip_bad=args.skip_bad_images)
    save_shard(args.out, moments, attrs)
    log.info("wrote %s moments of images %d..%d (shard %d of %d, %d vectors) to %s",
             args.space, attrs["start"], attrs["stop"] - 1, args.shard, args.shards,
             moments.count, args.out)


def cmd_merge_stats(args) -> None:
    from fdpipe.shards import merge_shard_files

    stats = merge_shard_files(args.shards)
    stats.save(args.out)
    log.info("merged %d shard(s) into statistics of %d %d-d features: %s", len(args.shards),
             stats.n, stats.dim, args.out)


def cmd_valfd(args) -> None:
    from fdpipe.evaluate import validation_fds, write_json

    if len(args.features) != len(args.stats) or len(args.features) != len(args.spaces):
        raise SystemExit("--spaces, --features and --stats need the same number of entries")
    pairs = {s: (f, t) for s, f, t in zip(args.spaces, args.features, args.stats)}
    write_json(args.out, validation_fds(pairs, published=args.published))


def cmd_pretrain(args) -> None:
    from fdpipe.generators.flow import FlowConfig, save_flow
    from fdpipe.generators.pretrain import PretrainConfig, pretrain_flow
    from fdpipe.store import read_images

    images, labels, attrs = read_images(args.train)
    spec = args.spec
    model_cfg = FlowConfig(channels=images.shape[1], resolution=images.shape[-1],
                           num_classes=int(labels.max()) + 1, **spec.get("options", {}))
    cfg = PretrainConfig.from_dict({**spec.get("pretrain", {}), "seed": args.seed})
    model, ema, history = pretrain_flow(images, labels, model_cfg, cfg)
    model.load_state_dict(ema.model.state_dict())
    save_flow(args.out, model, {"history": history, "train_file": args.train})


def _generator_source(args) -> dict[str, Any]:
    spec = args.spec.get("generator", {})
    checkpoint = args.generator_checkpoint or spec.get("checkpoint")
    return {"factory": spec.get("factory", "fdpipe.generators.flow:build_flow"),
            "checkpoint": checkpoint, "options": {} if checkpoint else spec.get("options", {})}


def cmd_finetune(args) -> None:
    from fdpipe import distributed
    from fdpipe.generators import load_generator
    from fdpipe.stats import GaussianStats
    from fdpipe.train import PREEMPTED_EXIT_CODE, FinetuneConfig, Preempted, finetune

    spec = args.spec
    run = spec["run"]
    source = _generator_source(args)
    generator = load_generator(source["factory"], source["checkpoint"], source["options"])
    spaces, refs = {}, {}
    for name, stats_path in zip(args.spaces, args.stats):
        spaces[name] = _space_from_spec(name, spec["spaces"][name])
        refs[name] = GaussianStats.load(stats_path, expect_dim=spaces[name].dim,
                                        expect_space=name)
    cfg = FinetuneConfig.from_dict({**run, "seed": args.seed,
                                    "guidance_scale": spec.get("guidance_scale", 1.0)})
    # Under torchrun every rank joins one process group; a plain run has one process.
    dist, device = distributed.setup(_device(args.device))
    if not dist.is_main:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        finetune(generator, spaces, refs, cfg, args.out_dir, source, device=device, dist=dist)
    except Preempted as err:
        log.warning("%s", err)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    finally:
        distributed.teardown(dist)


def cmd_sample(args) -> None:
    from fdpipe.generators import load_generator
    from fdpipe.generators.base import load_run_generator
    from fdpipe.sample import sample_to_file

    if args.run:
        generator = load_run_generator(args.run)
    else:
        source = _generator_source(args)
        generator = load_generator(source["factory"], source["checkpoint"], source["options"])
    sample_to_file(generator, args.out, args.grid, args.num_samples, args.steps,
                   guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                   seed=args.seed, device=_device(args.device), name=Path(args.out).stem)


def cmd_evaluate(args) -> None:
    from fdpipe.evaluate import evaluate_variant, write_json

    if args.images:
        from fdpipe.evaluate_images import evaluate_images

        config, specs = _config_spaces(args)
        spaces = {name: _space_from_spec(name, spec) for name, spec in specs.items()}
        args.device_obj = _device(args.device)
        evaluate_images(args, spaces, config)
        return
    missing = [flag for flag, value in (("--space", args.space), ("--features", args.features),
                                        ("--stats", args.stats), ("--valfd", args.valfd),
                                        ("--out", args.out)) if not value]
    if missing:
        raise ValueError(f"evaluating a feature file needs {', '.join(missing)}; to evaluate "
                         f"a folder or .npz of samples pass --images instead")
    write_json(args.out, evaluate_variant(args.features, args.stats[0], args.valfd, args.space))


def cmd_export_npz(args) -> None:
    from fdpipe.data.npz import NpzImageWriter

    image_set = _image_set(args)
    writer = None
    for images, _ in image_set.batches(args.batch_size):
        if images.shape[1] == 1:
            images = images.repeat(3, axis=1)
        if writer is None:
            writer = NpzImageWriter(args.out, image_set.count, images.shape[2], images.shape[3])
        writer.write(images)
    if writer is None:
        raise ValueError(f"{args.images}: no images to export")
    if image_set.bad is not None and image_set.bad.files:
        raise ValueError(f"{args.images}: {len(image_set.bad.files)} bad image(s) were skipped, "
                         f"so the export would hold fewer than {image_set.count} images; "
                         f"remove them from the folder and export again")
    writer.close()
    log.info("wrote %d images to %s", writer.written, args.out)


def cmd_aggregate(args) -> None:
    from fdpipe.report import aggregate

    spec = args.spec
    aggregate(args.evals, spec["spaces"], spec["fdrk_spaces"], args.csv, args.md, args.figure,
              variants=spec.get("variants"))


def cmd_experiment_table(args) -> None:
    from fdpipe.report import experiment_table

    spec = args.spec
    rows = dict(spec["rows"]) if isinstance(spec["rows"], list) else spec["rows"]
    experiment_table(spec["name"], spec["varied"], rows, spec["fixed"], args.evals,
                     spec["spaces"], spec["fdrk_spaces"], args.csv, args.md, args.figure,
                     costs=spec.get("costs"))


def cmd_rank_agreement(args) -> None:
    from fdpipe.report import rank_agreement

    rank_agreement(args.evals, args.spec["spaces"], args.spec["fdrk_spaces"], args.csv, args.md)


def cmd_check_config(args) -> None:
    from fdpipe.config import load_config

    config = load_config(args.configfile)
    print(json.dumps(config, indent=2) if args.show else f"{args.configfile}: valid")


IMAGES_HELP = ("image source: an image folder (ImageFolder or flat), an ADM .npz (arr_0), "
               "an fdpipe image file (.h5) or a manifest (.json)")


def _add_skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip files that do not decode; they are counted, logged and listed "
                        "in <output>.bad_images.json (default: stop at the first one)")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", type=int, default=None,
                   help="ADM centre-crop size for folders, in pixels (default: the manifest's, "
                        "or the short side of the first image)")
    _add_skip_bad(p)


def _add_space_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", default=None, help="config whose spaces to use")
    p.add_argument("--spec", type=_spec, default=None,
                   help="JSON object {space: {family, options, weights}} instead of a config")
    p.add_argument("--spaces", nargs="+", default=None, help="spaces to use (default: all)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (changes numbers)")
    _add_image_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info", help="logging level (default: info)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text, threads=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--log-level", default="info", help="logging level (default: info)")
        if threads:
            p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        return p

    p = add("fetch-data", cmd_fetch_data, "Make Fashion-MNIST available; print its folder.", False)
    p.add_argument("--root", default="auto", help="target folder, or 'auto' (default)")

    p = add("prepare", cmd_prepare, "Write a dataset split as an fdpipe image file "
            "(fashion-mnist) or a checked manifest (imagefolder, npz).", False)
    p.add_argument("--dataset", default="fashion-mnist",
                   choices=["fashion-mnist", "imagefolder", "npz"])
    p.add_argument("--root", default="auto", help="dataset folder, or 'auto' to locate/fetch it")
    p.add_argument("--split", required=True, choices=["train", "test"])
    p.add_argument("--source", default=None,
                   help="split folder or .npz relative to --root (default: the split name)")
    p.add_argument("--resolution", type=int, default=32, help="output size in pixels")
    p.add_argument("--subset", type=int, default=None, help="class-balanced subset size")
    p.add_argument("--seed", type=int, default=0)
    _add_skip_bad(p)
    p.add_argument("--out", required=True, help="output .h5 file or manifest .json")

    p = add("train-encoder", cmd_train_encoder, "Train a demo representation space.")
    p.add_argument("--space", required=True, help="space name (for logs)")
    p.add_argument("--spec", type=_spec, required=True, help="space config as JSON")
    p.add_argument("--train", required=True, help="train image file (.h5)")
    p.add_argument("--test", required=True, help="test image file (.h5) for the logged metric")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output weights file (.pt)")

    p = add("extract", cmd_extract, "Extract features of an image file in one space.")
    p.add_argument("--space", required=True)
    p.add_argument("--spec", type=_spec, required=True, help="space config as JSON")
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_image_options(p)
    p.add_argument("--out", required=True, help="output feature file (.h5)")

    p = add("stats", cmd_stats, "Compute float64 mean and covariance of a feature file, or of "
            "an image source in a set of spaces.")
    p.add_argument("--features", default=None, help="feature file (.h5)")
    p.add_argument("--out", default=None, help="output statistics (.npz) for --features")
    p.add_argument("--images", default=None, help=IMAGES_HELP)
    _add_space_selection(p)
    p.add_argument("--out-dir", default=None, help="folder for <space>.npz (with --images)")

    p = add("extract-shard", cmd_extract_shard, "Float64 feature moments of one shard of an "
            "image source in one space (merge them with merge-stats).")
    p.add_argument("--space", required=True)
    p.add_argument("--spec", type=_spec, required=True, help="space config as JSON")
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--shard", type=int, required=True, help="shard index, 0 to --shards - 1")
    p.add_argument("--shards", type=int, required=True, help="number of shards")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_image_options(p)
    p.add_argument("--out", required=True, help="output shard moments (.npz)")

    p = add("merge-stats", cmd_merge_stats, "Merge the shard moments of extract-shard into "
            "statistics (.npz).", False)
    p.add_argument("--shards", nargs="+", required=True, help="every shard file of one split")
    p.add_argument("--out", required=True, help="output statistics (.npz)")

    p = add("valfd", cmd_valfd, "FD of validation features against train statistics.", False)
    p.add_argument("--spaces", nargs="+", required=True)
    p.add_argument("--features", nargs="+", required=True)
    p.add_argument("--stats", nargs="+", required=True)
    p.add_argument("--published", type=_spec, default=None,
                   help="JSON {space: FD}: use these fixed normalisers for FDr and keep the "
                        "computed validation FD beside them")
    p.add_argument("--out", required=True, help="output JSON")

    p = add("pretrain", cmd_pretrain, "Train the built-in flow-matching base generator.")
    p.add_argument("--spec", type=_spec, required=True, help="generator config as JSON")
    p.add_argument("--train", required=True, help="train image file (.h5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint (.pt)")

    p = add("finetune", cmd_finetune, "Post-train a generator with FD-loss.")
    p.add_argument("--spec", type=_spec, required=True,
                   help="JSON with run, spaces, generator and guidance_scale")
    p.add_argument("--generator-checkpoint", default=None, help="base generator checkpoint")
    p.add_argument("--spaces", nargs="+", required=True)
    p.add_argument("--stats", nargs="+", required=True, help="train statistics per space")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out-dir", required=True)

    p = add("sample", cmd_sample, "Sample a generator into an image file and a PNG grid.")
    p.add_argument("--spec", type=_spec, default={}, help="generator config as JSON")
    p.add_argument("--generator-checkpoint", default=None, help="base generator checkpoint")
    p.add_argument("--run", default=None, help="fine-tuned checkpoint (generator.pt)")
    p.add_argument("--steps", type=int, default=1, help="sampler steps")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, help="output image file (.h5)")
    p.add_argument("--grid", default=None, help="output PNG grid")

    p = add("evaluate", cmd_evaluate, "FD and FDr of a feature file against statistics, or "
            "FD, FDr and FDr^k of a folder or .npz of samples.")
    p.add_argument("--space", default=None, help="space of --features")
    p.add_argument("--features", default=None, help="feature file (.h5)")
    p.add_argument("--stats", nargs="+", default=None,
                   help="train statistics: one .npz with --features; with --images one "
                        "SPACE=FILE per space, or use --stats-dir")
    p.add_argument("--valfd", default=None, help="validation FD JSON (FDr normalisers)")
    p.add_argument("--out", default=None, help="output JSON")
    p.add_argument("--images", default=None, help="samples: " + IMAGES_HELP)
    p.add_argument("--stats-dir", default=None, help="folder with <space>.npz statistics")
    p.add_argument("--normalisers", default=None, choices=["computed", "published"],
                   help="FDr normalisers: computed (--valfd) or published (config table); "
                        "default: the config's evaluation.normalisers")
    p.add_argument("--normaliser", nargs="+", default=[], metavar="SPACE=FD",
                   help="explicit FDr normalisers, overriding the others")
    _add_space_selection(p)

    p = add("export-npz", cmd_export_npz, "Write images as an ADM-style .npz (arr_0, "
            "uint8 N x H x W x 3).", False)
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--batch-size", type=int, default=500)
    _add_image_options(p)
    p.add_argument("--out", required=True, help="output .npz")

    p = add("aggregate", cmd_aggregate, "Write the FDr^k table and figure.", False)
    p.add_argument("--spec", type=_spec, required=True,
                   help="JSON with spaces, fdrk_spaces and variants")
    p.add_argument("--evals", nargs="+", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--figure", default=None)

    p = add("experiment-table", cmd_experiment_table, "Write the table of an experiment set.",
            False)
    p.add_argument("--spec", type=_spec, required=True,
                   help="JSON with name, varied, rows, fixed, spaces, fdrk_spaces, costs")
    p.add_argument("--evals", nargs="+", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--figure", default=None)

    p = add("rank-agreement", cmd_rank_agreement,
            "Kendall tau between the run rankings of each pair of spaces.", False)
    p.add_argument("--spec", type=_spec, required=True, help="JSON with spaces, fdrk_spaces")
    p.add_argument("--evals", nargs="+", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)

    p = add("check-config", cmd_check_config, "Validate a config file.", False)
    p.add_argument("configfile")
    p.add_argument("--show", action="store_true", help="print it with defaults filled in")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup(args)
    try:
        args.func(args)
    except (FileNotFoundError, KeyError, ValueError, TypeError, ImportError, RuntimeError) as err:
        log.error("%s failed: %s", args.command, err)
        log.debug("traceback of the failure", exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
