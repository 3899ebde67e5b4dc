"""The bundled world's DINO: a small ViT trained with the DINO objective on world renders.

Public DINO checkpoints cannot be downloaded where this project builds, and would know nothing of
the world's products anyway. This is DINO (Caron et al., 2021) at toy scale: a student and a
teacher ViT (the teacher an exponential moving average of the student), multi-crop (two global
crops the teacher sees, local crops only the student sees), and the teacher's outputs centred and
sharpened before the student is asked to match them. No label is used. The views of one sample are
crops of two renders of the same product (the world's renderer is the augmentation that moves the
product to another scene, pose, scale and light) rather than of one photo; photometric
augmentations leave hue alone, because in this world colour is identity.

The backbone is a transformers `ViTModel` saved with its `ViTImageProcessor`, so the platform's
`DinoEmbedder` (the CLS token of the last layer) loads it as it loads `facebook/dino-vits16`.

    python -m dreamcache.world.dino --output dreamcache/assets/product-world/dino --minutes 25

trains it on the CPU and prints the held-out gate (`evaluate`): how often the nearest neighbour of
a held-out product in one scene, among held-out products in another scene, is the same product.
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
from torch import nn
from torch.nn import functional as F

from dreamcache.perception.segmentation import subject_on_white
from dreamcache.world import scene as world

logger = logging.getLogger(__name__)

EVALUATION_SEEDS = 1_000_000_000  # never drawn in training
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoConfig:
    image_size: int = 64  # the processor resizes every image (a 128 px shot, a 224 px cut-out) to this
    patch_size: int = 8  # 8x8 patches of 8 px
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    out_dim: int = 1024  # prototypes of the DINO head (training only: not shipped)


@dataclass
class TrainConfig:
    steps: int = 100_000  # an upper bound: the time box usually ends training first
    minutes: float = 25.0
    batch_size: int = 48
    local_crops: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.04
    warmup: int = 100
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04  # sharpening
    center_momentum: float = 0.9  # centering
    teacher_momentum: float = 0.99  # to 1 along a cosine: a short training wants a faster teacher than DINO's 0.996
    freeze_last_layer: int = 100  # steps: DINO's remedy for an unstable start
    seed: int = 0


def backbone(config: DinoConfig = DinoConfig()):
    from transformers import ViTConfig, ViTModel

    vit = ViTConfig(image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
                    num_hidden_layers=config.layers, num_attention_heads=config.heads,
                    intermediate_size=4 * config.hidden_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTModel(vit, add_pooling_layer=False)


class DinoHead(nn.Module):
    """DINO's projection head: a 3-layer MLP to a bottleneck, then a cosine layer over the prototypes
    (the weight-normalised last layer with its norm fixed at 1)."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class Dino(nn.Module):
    """Backbone + head; `embed` is the CLS token of the last layer, as the scorer reads it."""

    def __init__(self, config: DinoConfig = DinoConfig()):
        super().__init__()
        self.config = config
        self.backbone = backbone(config)
        self.head = DinoHead(config.hidden_size, config.out_dim)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        return hidden[:, 0]  # (B, D): the CLS token, after the backbone's final layer norm

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Cross-entropy of each student view against each teacher (global) view of another crop.

    student: per view (B, K) logits, the global views first; teacher: per global view (B, K)."""
    targets = [F.softmax((t - center) / teacher_temperature, dim=-1).detach() for t in teacher]
    logs = [F.log_softmax(s / student_temperature, dim=-1) for s in student]
    total, terms = 0.0, 0
    for i, target in enumerate(targets):
        for j, log in enumerate(logs):
            if i == j:  # the same crop: nothing to learn
                continue
            total = total + (-target * log).sum(-1).mean()
            terms += 1
    return total / terms


# --- views -----------------------------------------------------------------------------------

def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def render(index: int, seed: int, size: int = 128) -> torch.Tensor:
    """A render of product `index`, (3, size, size) in [0, 1]: in a scene, on white (a reference), or
    cut out of a scene with its true mask (what a masked score sees), by the seed."""
    item = world.product(index)
    kind = seed % 3
    rng = np.random.default_rng([seed, index, 5])
    scene = list(world.SCENES)[int(rng.integers(len(world.SCENES)))]
    if kind == 1:
        return _pixels(world.reference_image(item, size, seed))
    image, mask = world.scene_image(item, scene, size, seed)
    return _pixels(image if kind == 0 else subject_on_white(image, mask, size))


def crops(sources: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Random resized square crops (area share in `scale`), flipped half the time: (B, 3, size, size)."""
    b = sources.shape[0]
    side = torch.sqrt(scale[0] + (scale[1] - scale[0]) * torch.rand(b, generator=generator))
    centre = (1 - side)[:, None] * (2 * torch.rand(b, 2, generator=generator) - 1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="border", align_corners=False)


def photometric(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light, contrast, blur and noise; never hue or saturation (colour is identity here)."""
    b = pixels.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, 1, 1, 1, generator=generator)

    mean = pixels.mean((1, 2, 3), keepdim=True)
    pixels = (pixels - mean) * uniform(0.8, 1.2) + mean * uniform(0.8, 1.2)
    blurred = F.avg_pool2d(pixels, 3, 1, 1, count_include_pad=False)
    pixels = torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.3, blurred, pixels)
    return (pixels + uniform(0, 0.03) * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> ImageNet-normalised, as the shipped processor does."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std


def views(step: int, config: TrainConfig, model: DinoConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """The step's views: two global crops (one of each render of the product) and `local_crops`
    small ones, alternating between the renders; each (B, 3, side, side), normalised."""
    rng = np.random.default_rng([config.seed, step])
    indices = [int(i) for i in rng.integers(0, 1_000_000, config.batch_size * 3)]
    indices = [i for i in indices if not world.is_held_out(i)][: config.batch_size]
    seeds = rng.integers(0, EVALUATION_SEEDS, (2, len(indices)))
    # Rendered at the model's side directly: the world draws at 4x and downsamples, at any size.
    sources = [torch.stack([render(i, int(s), model.image_size) for i, s in zip(indices, seeds[k])]) for k in range(2)]
    out = [crops(sources[k], model.image_size, (0.4, 1.0), generator) for k in range(2)]
    local = model.image_size // 2
    out += [crops(sources[k % 2], local, (0.1, 0.4), generator) for k in range(config.local_crops)]
    return [normalise(photometric(v, generator)) for v in out]


# --- training --------------------------------------------------------------------------------

def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(output: Path | None, config: TrainConfig = TrainConfig(), model_config: DinoConfig = DinoConfig(),
          log_every: int = 25, init: Path | None = None) -> tuple[Dino, dict]:
    """Student and teacher from one initialisation; the student learns, the teacher follows it by EMA.

    Stops at the step count or the time box; the schedules (learning rate, teacher momentum) run
    over the steps the time box allows, estimated after the warm-up. With `init`, the backbone starts
    from the one saved there (a fresh head: only the backbone is shipped)."""
    import copy

    from transformers import ViTModel

    torch.manual_seed(config.seed)
    student = Dino(model_config)
    if init:
        student.backbone = ViTModel.from_pretrained(init, add_pooling_layer=False, dtype=torch.float32)
    teacher = copy.deepcopy(student).requires_grad_(False)
    center = torch.zeros(model_config.out_dim)
    decay = [p for n, p in student.named_parameters() if p.ndim > 1 and "prototypes" not in n]
    rest = [p for n, p in student.named_parameters() if not (p.ndim > 1 and "prototypes" not in n)]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=config.weight_decay),
                                   dict(params=rest, weight_decay=0.0)], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    start, losses, planned = time.monotonic(), [], config.steps
    for step in range(config.steps):
        if step == config.warmup:
            pace = (time.monotonic() - start) / step
            planned = min(config.steps, max(step + 1, int(config.minutes * 60 / pace)))
        if step >= planned or time.monotonic() - start > config.minutes * 60:  # the pace can drop on shared cores
            break
        progress = step / planned
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup) * _cosine(1.0, 0.0, progress)
        crops_ = views(step, config, model_config, generator)
        with torch.no_grad():
            teacher_out = [teacher(v) for v in crops_[:2]]
        student_out = [student(v) for v in crops_]
        loss = dino_loss(student_out, teacher_out, center, config.student_temperature, config.teacher_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < config.freeze_last_layer:
            student.head.prototypes.grad = None
        nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        optimizer.step()
        with torch.no_grad():
            m = _cosine(config.teacher_momentum, 1.0, progress)
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            batch_center = torch.cat(teacher_out).mean(0)
            center.mul_(config.center_momentum).add_(batch_center, alpha=1 - config.center_momentum)
        losses.append(loss.item())
        if step % log_every == 0:
            # The teacher's entropy tells collapse apart: near 0 (one prototype) or near log K (uniform).
            probs = F.softmax((teacher_out[0] - center) / config.teacher_temperature, -1)
            entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
            logger.info("step %d/%d loss %.4f teacher entropy %.2f (%.0f s)", step, planned, loss.item(), entropy,
                        time.monotonic() - start)
    record = dict(steps=len(losses), seconds=round(time.monotonic() - start, 1),
                  samples=len(losses) * config.batch_size, loss_first_100=float(np.mean(losses[:100])),
                  loss_last_100=float(np.mean(losses[-100:])), train=asdict(config), model=asdict(model_config),
                  threads=torch.get_num_threads())
    if output:
        save_pretrained(teacher, output)  # the teacher, as DINO ships
    return teacher.eval(), record


def save_pretrained(model: Dino, directory: str | Path) -> Path:
    """The backbone alone, fp16, as a transformers ViT directory with its image processor."""
    import copy

    from transformers import ViTImageProcessor

    directory = Path(directory)
    copy.deepcopy(model.backbone).to(torch.float16).save_pretrained(directory)
    size = model.config.image_size
    ViTImageProcessor(size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC,
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(directory)
    return directory


# --- the gate --------------------------------------------------------------------------------

def retrieval(embed, products: int = 60, size: int = 128) -> dict:
    """Nearest-neighbour identification of held-out products across scenes.

    Each held-out product is rendered in two scenes (other kinds, seeds never drawn in training);
    each render of the first set is a query against all renders of the second. Measured on the
    whole images, on the products cut out with their true masks (what MDINO compares), and against
    the products' references on white (what DINO compares a shot with)."""
    items = world.held_out_products(products)
    names = list(world.SCENES)
    first, second, refs = [], [], []
    for p, item in enumerate(items):
        a = world.scene_image(item, names[p % len(names)], size, EVALUATION_SEEDS + 2 * p)
        b = world.scene_image(item, names[(p + 3) % len(names)], size, EVALUATION_SEEDS + 2 * p + 1)
        first.append(a)
        second.append(b)
        rng = np.random.default_rng([EVALUATION_SEEDS + p, item.index, 2])  # world.reference_image's draw, with its mask
        refs.append(world.place(item, Image.new("RGB", (size, size), "white"), rng, scale=rng.uniform(0.7, 0.95)))

    def accuracy(queries, gallery) -> float:
        q, g = embed(queries), embed(gallery)
        return float(((q @ g.T).argmax(1) == torch.arange(len(queries))).float().mean())

    return dict(products=products,
                scene_to_scene=accuracy([a for a, _ in first], [b for b, _ in second]),
                masked_scene_to_scene=accuracy([subject_on_white(a, m, 224) for a, m in first],
                                               [subject_on_white(b, m, 224) for b, m in second]),
                scene_to_reference=accuracy([a for a, _ in first], [r for r, _ in refs]),
                masked_scene_to_reference=accuracy([subject_on_white(a, m, 224) for a, m in first],
                                                   [subject_on_white(r, m, 224) for r, m in refs]))


def evaluate(directory: str | Path, products: int = 60) -> dict:
    """The gate on the shipped weights, loaded as the scorer loads them."""
    from dreamcache.perception.scoring import DinoEmbedder

    embedder = DinoEmbedder(str(directory), torch.device("cpu"))
    return retrieval(embedder.images, products)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="directory for the ViT and its processor")
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="time box of the training")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the project's machines have two cores)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--init", type=Path, help="go on training the backbone saved in this directory")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the model in --output, do not train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    record = {}
    if not args.evaluate_only:
        _, record = train(args.output, TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                                                   lr=args.lr, seed=args.seed), init=args.init)
    record["gate"] = evaluate(args.output)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
