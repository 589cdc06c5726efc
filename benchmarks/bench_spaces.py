"""Feature-extraction throughput of the six paper-scale spaces, in images per second.

On CUDA: the full-size architectures with random weights (timm
``pretrained=False``, Inception-v3 with random weights in torch-fidelity's
format), 2,048 random 256x256 images per space, bf16 autocast, after one
warm-up batch. Without CUDA the full run is skipped with a message and a tiny
CPU variant runs instead (small architectures, a few images) so the script
itself stays tested; its numbers do not describe the paper-scale spaces.

    python benchmarks/bench_spaces.py [--images 2048] [--batch-size 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets thread counts before torch loads)
import torch

from fdpipe.spaces import SpaceSpec, build_space
from fdpipe.spaces.inception import save_random_weights
from fdpipe.spaces.timm_space import wrap_model

# name: (timm model, input size, pooling), as in config/imagenet256.yaml.
PAPER_TIMM = {
    "convnext": ("convnextv2_base.fcmae_ft_in22k_in1k", 224, "avg"),
    "dinov2": ("vit_large_patch14_dinov2.lvd142m", 256, "cls"),
    "mae": ("vit_large_patch16_224.mae", 224, "cls"),
    "siglip": ("vit_so400m_patch16_siglip_256.v2_webli", 224, "cls"),
    "clip": ("vit_large_patch14_clip_224.openai", 256, "cls"),
}
# Small stand-ins of the same families for the CPU variant.
TINY_TIMM = {
    "convnext": ("convnextv2_atto", 64, "avg", {}),
    "dinov2": ("vit_tiny_patch16_224", 64, "cls", {"depth": 2}),
    "mae": ("vit_tiny_patch16_224", 64, "avg", {"depth": 2}),
    "siglip": ("vit_base_patch16_siglip_224", 64, "cls",
               {"depth": 2, "embed_dim": 64, "num_heads": 2}),
    "clip": ("vit_tiny_patch16_224", 64, "cls", {"depth": 2}),
}


def build_spaces(tiny: bool, workdir: Path) -> dict[str, torch.nn.Module]:
    """Random-weight networks with the same preprocessing and pooling as the real spaces."""
    import timm

    weights = workdir / "inception-random.pth"
    save_random_weights(weights)
    spaces = {"inception": build_space(SpaceSpec("inception", "inception",
                                                 weights=str(weights))).network}
    table = TINY_TIMM if tiny else {k: (*v, {}) for k, v in PAPER_TIMM.items()}
    for name, (model_name, size, pooling, kwargs) in table.items():
        extra = {"img_size": size} if "vit" in model_name else {}
        model = timm.create_model(model_name, pretrained=False, **extra, **kwargs)
        model.reset_classifier(0)
        spaces[name] = wrap_model(model.eval(), pooling, size)
    return spaces


@torch.no_grad()
def images_per_second(network: torch.nn.Module, images: torch.Tensor, batch_size: int,
                      device: torch.device) -> float:
    network = network.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(batch: torch.Tensor) -> None:
        with autocast:
            network.features(batch.to(device, non_blocking=True).float().div_(255.0))

    run(images[:batch_size])  # warm-up: kernel selection, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, images.shape[0], batch_size):
        run(images[first : first + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="images per space (CUDA)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpu-images", type=int, default=16, help="images per space (CPU variant)")
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("CUDA is not available: skipping the full-size bf16 benchmark; running the tiny "
              "CPU variant (small stand-in architectures, float32) to check the script.")
    count = args.images if cuda else args.cpu_images
    batch_size = args.batch_size if cuda else min(args.batch_size, 8)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 256, 256), dtype=torch.uint8, generator=generator)
    if cuda:
        images = images.pin_memory()

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu",
               "variant": "full-size, bf16 autocast" if cuda else "tiny CPU stand-ins, float32",
               "images": count, "batch_size": batch_size, "images_per_second": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for name, network in build_spaces(not cuda, Path(workdir)).items():
            rate = images_per_second(network, images, batch_size, device)
            results["images_per_second"][name] = round(rate, 2)
            print(f"{name:<10} {rate:10.1f} images/s")
            network.cpu()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
