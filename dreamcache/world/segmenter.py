"""The bundled world's segmenter: a small U-Net that cuts products out of world scenes, holes kept.

The border-colour segmenter finds a product only on plain backgrounds, and the bundled model's
shots are scenes (a beach, a lawn, a forest). This one is trained on world renders with their exact
masks: products in scenes and on white (the reference cut-outs), training instances only, with
photometric augmentations (blur, noise, contrast, light) that stand in for a generated shot's
softness. Its mask is what the network sees, never hole-filled: a mug's handle encloses background.

    python -m dreamcache.world.segmenter --output dreamcache/assets/product-world/segmenter --minutes 20

trains it on the CPU (one thread by default) and prints the held-out gate (`evaluate`): IoU against
the true masks on held-out products in scenes never rendered for training, and the IoU of the hole
inside each mug's handle. Weights: one fp16 safetensors file beside a JSON config.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from dreamcache.perception.segmentation import QualityLimits, Segmentation, check_mask, keep_holes
from dreamcache.world import scene as world

logger = logging.getLogger(__name__)

WEIGHTS, CONFIG = "segmenter.safetensors", "segmenter_config.json"
# Seeds at or above this are never drawn in training: the gate's scenes come from there.
EVALUATION_SEEDS = 1_000_000_000


@dataclass(frozen=True)
class SegmenterConfig:
    resolution: int = 128  # the world's; other sizes are resized to it and the mask back
    channels: tuple[int, ...] = (16, 24, 32, 48, 64)  # one level per entry, each halving the side


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU())


class UNet(nn.Module):
    """(B, 3, R, R) in [-1, 1] -> (B, 1, R, R) product logits."""

    def __init__(self, config: SegmenterConfig = SegmenterConfig()):
        super().__init__()
        self.config = config
        c = config.channels
        self.down = nn.ModuleList(_double_conv(cin, cout) for cin, cout in zip((3,) + c[:-1], c))
        self.up = nn.ModuleList(_double_conv(c[i + 1] + c[i], c[i]) for i in reversed(range(len(c) - 1)))
        self.out = nn.Conv2d(c[0], 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = []
        x = images
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.out(x)

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy plus soft Dice (the Dice term keeps small products from being ignored)."""
        logits = self(images)
        target = masks.float().unsqueeze(1)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p = logits.sigmoid()
        dice = 1 - (2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
        return bce + dice.mean()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H, W) bool masks at the input's size."""
        size = images.shape[-2:]
        r = self.config.resolution
        if tuple(size) != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        logits = self(images)
        if tuple(size) != (r, r):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[:, 0] > 0

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.state_dict().items()},
                  directory / WEIGHTS)
        (directory / CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "UNet":
        directory = Path(directory)
        for name in (CONFIG, WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"segmenter file {directory / name} not found: train one with "
                                        "python -m dreamcache.world.segmenter --output DIR")
        config = json.loads((directory / CONFIG).read_text())
        model = cls(SegmenterConfig(config["resolution"], tuple(config["channels"])))
        model.load_state_dict({k: v.float() for k, v in load_file(directory / WEIGHTS).items()})
        return model.eval()


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1


class WorldSegmenter:
    """The platform's `Segmenter` for the bundled world: the U-Net's mask, checked like any other."""

    method = "world-unet"

    def __init__(self, model: UNet, limits: QualityLimits = QualityLimits()):
        self.model = model.eval()
        self.limits = limits

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "WorldSegmenter":
        return cls(UNet.from_pretrained(directory))

    def mask(self, image: Image.Image) -> np.ndarray:
        return self.model.predict(to_pixels(image))[0].numpy()

    def segment(self, image: Image.Image, category: str | None = None, name: str = "<image>") -> Segmentation:
        """The network's mask, the photo's background seen through its holes taken out (`keep_holes`: the network
        leaves about a fifth of a handle's hole as product)."""
        return check_mask(keep_holes(image, self.mask(image)), self.method, name, self.limits)


# --- data ------------------------------------------------------------------------------------

def sample(seed: int, size: int, held_out: bool = False) -> tuple[Image.Image, np.ndarray]:
    """A world image with its exact mask: a product in a scene, one in four on white (a reference), and
    one in sixteen a scene with no product at all (an empty mask: a shot may lack its product)."""
    t = world.triplet(seed, size, held_out=held_out)
    if seed % 16 == 1:
        return world.background(t.scene, size, np.random.default_rng([seed, 6])), np.zeros((size, size), dtype=bool)
    if seed % 4:
        return t.target, t.mask
    rng = np.random.default_rng([seed, t.product.index, 3])
    return world.place(t.product, Image.new("RGB", (size, size), "white"), rng, scale=rng.uniform(0.4, 0.95))


def batch(seeds, size: int, held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = zip(*(sample(int(s), size, held_out) for s in seeds))
    pixels = torch.cat([to_pixels(i) for i in images])
    return pixels, torch.from_numpy(np.stack(masks))


def augment(pixels: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, light and contrast, blur and noise: a generated shot is softer and noisier than a render."""
    b = pixels.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, 1, 1, 1, generator=generator)

    flip = torch.rand(b, generator=generator) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    mean = pixels.mean((1, 2, 3), keepdim=True)
    pixels = (pixels - mean) * uniform(0.7, 1.3) + mean + uniform(-0.2, 0.2)
    pixels = pixels * (1 + 0.1 * torch.randn(b, 3, 1, 1, generator=generator))  # a slight colour cast
    # Blur half of them (a box blur of 3 or 5, as a decoded latent's softness), noise all.
    blurred = torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.5,
                          F.avg_pool2d(pixels, 3, 1, 1, count_include_pad=False),
                          F.avg_pool2d(pixels, 5, 1, 2, count_include_pad=False))
    pixels = torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.5, blurred, pixels)
    pixels = pixels + uniform(0, 0.08) * torch.randn(pixels.shape, generator=generator)
    return pixels.clamp(-1.2, 1.2), masks


# --- training and the gate -------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int = 100_000  # an upper bound: the time box usually ends training first
    minutes: float = 20.0
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0


def train(output: Path | None, config: TrainConfig = TrainConfig(), model_config: SegmenterConfig = SegmenterConfig(),
          log_every: int = 50, init: Path | None = None) -> tuple[UNet, dict]:
    """Train on freshly rendered training images (never the same one twice) until the step count or
    the time box; a cosine schedule over whichever the time box allows, estimated after the warm-up.
    With `init`, training goes on from the weights saved there (on images it has not seen)."""
    torch.manual_seed(config.seed)
    model = UNet.from_pretrained(init).train() if init else UNet(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    start, losses, planned = time.monotonic(), [], config.steps
    for step in range(config.steps):
        if step == config.warmup:  # the steps the time box allows, at the measured pace
            pace = (time.monotonic() - start) / step
            planned = min(config.steps, max(step + 1, int(config.minutes * 60 / pace)))
        if step >= planned or time.monotonic() - start > config.minutes * 60:  # the pace can drop on shared cores
            break
        lr_scale = min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / planned)))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_scale
        seeds = range((config.seed + step) * config.batch_size, (config.seed + step + 1) * config.batch_size)
        pixels, masks = augment(*batch(seeds, model_config.resolution), generator)
        loss = model.loss(pixels, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0:
            logger.info("step %d/%d loss %.4f (%.0f s)", step, planned, loss.item(), time.monotonic() - start)
    model.eval()
    record = dict(steps=len(losses), seconds=round(time.monotonic() - start, 1), images=len(losses) * config.batch_size,
                  loss_first_100=float(np.mean(losses[:100])), loss_last_100=float(np.mean(losses[-100:])),
                  train=asdict(config), threads=torch.get_num_threads())
    if output:
        model.save_pretrained(output)
    return model, record


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def handle_hole(item: world.Product, size: int, seed: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """A held-out mug on white with its mask and the true hole inside its handle (background enclosed by product)."""
    from scipy import ndimage

    rng = np.random.default_rng([seed, item.index, 4])
    image, mask = world.place(item, Image.new("RGB", (size, size), "white"), rng, scale=rng.uniform(0.7, 0.95))
    return image, mask, ndimage.binary_fill_holes(mask) & ~mask


def evaluate(segmenter: WorldSegmenter, products: int = 60, scenes_per_product: int = 4, size: int = 128) -> dict:
    """The gate: held-out products in scenes never rendered for training.

    IoU against the true masks (mean, and the share of images at 0.90 or more), per scene; and for
    held-out mugs on white, how much of the true hole in the handle the predicted mask leaves as
    background (1.0: the whole hole is kept)."""
    ious, per_scene = [], {}
    for p, item in enumerate(world.held_out_products(products)):
        for k in range(scenes_per_product):
            scene = list(world.SCENES)[(p + 3 * k) % len(world.SCENES)]
            image, mask = world.scene_image(item, scene, size, EVALUATION_SEEDS + 1_000 * p + k)
            iou = _iou(segmenter.mask(image), mask)
            ious.append(iou)
            per_scene.setdefault(scene, []).append(iou)
    holes = []
    for item in (m for m in world.held_out_products(6 * 10) if m.family == "mug"):
        image, mask, hole = handle_hole(item, size, EVALUATION_SEEDS)
        if hole.any():
            holes.append(float((~segmenter.mask(image) & hole).sum() / hole.sum()))
    return dict(images=len(ious), mean_iou=float(np.mean(ious)), share_iou_0_90=float(np.mean(np.array(ious) >= 0.9)),
                min_iou=float(np.min(ious)), per_scene={s: round(float(np.mean(v)), 4) for s, v in per_scene.items()},
                mugs=len(holes), handle_hole_kept=float(np.mean(holes)) if holes else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="directory for the config and the weights")
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="time box of the training")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the project's machines have two cores)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="also where the training images start")
    parser.add_argument("--init", type=Path, help="go on training the model saved in this directory")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the model in --output, do not train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        segmenter = WorldSegmenter.from_pretrained(args.output)
        record = {}
    else:
        _, record = train(args.output, TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                                                   lr=args.lr, seed=args.seed), init=args.init)
        segmenter = WorldSegmenter.from_pretrained(args.output)  # the shipped fp16 weights, not the training copy
    record["gate"] = evaluate(segmenter)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
