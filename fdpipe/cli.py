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


def _space_from_spec(name: str, spec: dict[str, Any]):
    from fdpipe.spaces import SpaceSpec, build_space

    return build_space(SpaceSpec(name=name, family=spec["family"],
                                 options=spec.get("options", {}), weights=spec.get("weights")))


def cmd_fetch_data(args) -> None:
    from fdpipe.data import fashion_mnist

    root = fashion_mnist.fetch(None if args.root == "auto" else args.root)
    print(root)


def cmd_prepare(args) -> None:
    from fdpipe.data import fashion_mnist
    from fdpipe.data.images import prepare_split

    root = args.root
    if root == "auto":
        root = fashion_mnist.fetch()
    prepare_split(dataset=args.dataset, root=root, split=args.split, resolution=args.resolution,
                  out=args.out, subset=args.subset, seed=args.seed)


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
                 device=_device(args.device))


def cmd_stats(args) -> None:
    from fdpipe.evaluate import write_stats

    write_stats(args.features, args.out)


def cmd_valfd(args) -> None:
    from fdpipe.evaluate import validation_fds, write_json

    if len(args.features) != len(args.stats) or len(args.features) != len(args.spaces):
        raise SystemExit("--spaces, --features and --stats need the same number of entries")
    pairs = {s: (f, t) for s, f, t in zip(args.spaces, args.features, args.stats)}
    write_json(args.out, validation_fds(pairs))


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
    from fdpipe.generators import load_generator
    from fdpipe.stats import GaussianStats
    from fdpipe.train import FinetuneConfig, finetune

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
    finetune(generator, spaces, refs, cfg, args.out_dir, source, device=_device(args.device))


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

    write_json(args.out, evaluate_variant(args.features, args.stats, args.valfd, args.space))


def cmd_aggregate(args) -> None:
    from fdpipe.report import aggregate

    spec = args.spec
    aggregate(args.evals, spec["spaces"], spec["fdrk_spaces"], args.csv, args.md, args.figure,
              variants=spec.get("variants"))


def cmd_check_config(args) -> None:
    from fdpipe.config import load_config

    config = load_config(args.configfile)
    print(json.dumps(config, indent=2) if args.show else f"{args.configfile}: valid")


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

    p = add("prepare", cmd_prepare, "Write a dataset split as an fdpipe image file.", False)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--root", default="auto", help="dataset folder, or 'auto' to locate/fetch it")
    p.add_argument("--split", required=True, choices=["train", "test"])
    p.add_argument("--resolution", type=int, default=32, help="output size in pixels")
    p.add_argument("--subset", type=int, default=None, help="class-balanced subset size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5 file")

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
    p.add_argument("--images", required=True, help="image file (.h5)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, help="output feature file (.h5)")

    p = add("stats", cmd_stats, "Compute float64 mean and covariance of a feature file.", False)
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="output statistics (.npz)")

    p = add("valfd", cmd_valfd, "FD of validation features against train statistics.", False)
    p.add_argument("--spaces", nargs="+", required=True)
    p.add_argument("--features", nargs="+", required=True)
    p.add_argument("--stats", nargs="+", required=True)
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

    p = add("evaluate", cmd_evaluate, "FD and FDr of a feature file against statistics.", False)
    p.add_argument("--space", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--stats", required=True, help="train statistics (.npz)")
    p.add_argument("--valfd", required=True, help="validation FD JSON (FDr normalisers)")
    p.add_argument("--out", required=True, help="output JSON")

    p = add("aggregate", cmd_aggregate, "Write the FDr^k table and figure.", False)
    p.add_argument("--spec", type=_spec, required=True,
                   help="JSON with spaces, fdrk_spaces and variants")
    p.add_argument("--evals", nargs="+", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--figure", default=None)

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
        if args.log_level.lower() == "debug":
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
