"""Training the project's own small Stable-Diffusion-architecture model on the procedural world.

Stages, run in order, each saving its result so that a later call resumes after the last finished one:

1. **Pool**: N triplets rendered once by worker processes and kept on the GPU as uint8, so no
   stage waits on the CPU (the world is cheap to render, but not at GPU speed).
2. **VAE** (`AutoencoderKL`, 64 px -> 16x16x4 latents): L1 reconstruction + a small KL term, on
   scenes and references; its scaling factor is set so that latents have unit variance, as SD's is.
3. **CLIP** (`CLIPModel`, small ViT and text transformer over the byte-level tokenizer): contrastive
   on (scene, caption). The world has only 48 captions, so each image is classified against all of
   them and each caption's positives are every image that carries it (no false negatives). Its text
   tower conditions the UNet; the whole model is the toy world's CLIP-T scorer.
4. **UNet** (`UNet2DConditionModel`, SD layout): v-prediction at zero terminal SNR (`scheduler()`) on
   scene latents, captions dropped 10% of the time for classifier-free guidance; the exported weights
   are an EMA of the training ones.
5. **Classifier**: the attribute classifier that measures fidelity (`dreamcache.world_classifier`),
   on scenes and on their VAE round trips (so that it reads the decoder's images as well as renders).
6. **Adapters**: the platform's own trainer (`dreamcache.training`) on world triplets (`world://`),
   for the default preset and, for the paper's placement ablation, the middle-only preset.

The result is a plain diffusers directory (`base/`) plus adapter directories, the CLIP scorer and
the classifier, loaded by the same code paths as real Stable Diffusion and its scorers.

    python -m dreamcache.world_model --output models/world --workers 14     # about 30 min on one H100
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from dreamcache import world
from dreamcache.architectures import tiny_tokenizer
from dreamcache.world_classifier import HEADS, AttributeClassifier
from dreamcache.world_classifier import labels as attribute_labels

logger = logging.getLogger(__name__)

RESOLUTION = 64
EMPTY = len(world.CAPTIONS)  # the index of the empty caption in the UNet's text table


@dataclass
class StageSteps:
    """Every stage's size and optimiser settings; the defaults are the shipped model's (one H100)."""

    pool_size: int = 100_000  # rendered triplets the base stages draw from (training instances only)
    batch_size: int = 128
    vae_steps: int = 2000
    clip_steps: int = 1200
    unet_steps: int = 6000
    unet_batch_size: int = 512
    # The loss weight of the product's pixels against the scene's: a product is a tenth of a shot, and
    # unweighted, the scenes' grain dominates the loss while the product's colour is left at the mean.
    product_weight: float = 5.0
    classifier_steps: int = 1200
    # The cache's effect on the loss plateaus by about 1,500 steps of 1,024 (docs/toy-world.md), and a
    # hundred times the paper's learning rate (1e-5, for 200k steps) gets there in minutes.
    adapter_steps: int = 1600
    adapter_batch_size: int = 1024
    learning_rate: float = 3e-4
    adapter_learning_rate: float = 1e-3
    seed: int = 0
    workers: int = 0  # processes rendering the world (use most CPU cores on a GPU machine)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 128), layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, sample_size=RESOLUTION)


def make_clip(tokenizer) -> CLIPModel:
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=RESOLUTION, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128))


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(64, 128, 256), layers_per_block=1,
                                # diffusers reads this as the number of heads (a known misnomer): 32 channels per head
                                attention_head_dim=(2, 4, 8), cross_attention_dim=128, norm_num_groups=16)


def scheduler() -> DDIMScheduler:
    """SD's noise levels rescaled to zero terminal SNR, with v-prediction and trailing timesteps.

    SD's own schedule ends at SNR 0.0047: trained on it, a 16x16 latent's low frequencies (a product's
    colour) still show through the noise at t = 999, so the model learns to read them there, and from
    pure noise at sampling time it draws one colour for nearly every product (docs/toy-world.md,
    second training). Zero terminal SNR needs v-prediction (an epsilon target carries no information
    at t = 999); both are scheduler settings that the same pipeline code reads, as for SD 2.x models.
    """
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing")


# --- the pool of rendered triplets ----------------------------------------------------------

@dataclass
class WorldPool:
    """Rendered triplets as tensors: images (N, 3, R, R) uint8, caption indices, attribute labels, and
    the product's exact mask in each target."""

    targets: torch.Tensor
    references: torch.Tensor
    captions: torch.Tensor  # (N,) index into world.CAPTIONS
    labels: dict[str, torch.Tensor]  # head -> (N,)
    masks: torch.Tensor  # (N, R, R) bool

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device) -> "WorldPool":
        return WorldPool(self.targets.to(device), self.references.to(device), self.captions.to(device),
                         {h: v.to(device) for h, v in self.labels.items()}, self.masks.to(device))

    def sample(self, generator: torch.Generator, size: int) -> torch.Tensor:
        """Random indices, drawn on the CPU (reproducible on any device), on the pool's device."""
        return torch.randint(len(self), (size,), generator=generator).to(self.captions.device)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], as the VAE expects."""
    return images.float() / 127.5 - 1


def to_uint8_tensor(images) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


class _PoolChunks(torch.utils.data.Dataset):
    """Chunk k of the pool, rendered in a data-loader worker."""

    def __init__(self, size: int, seed: int, chunk: int, resolution: int):
        self.size, self.seed, self.chunk, self.resolution = size, seed, chunk, resolution

    def __len__(self) -> int:
        return -(-self.size // self.chunk)

    def __getitem__(self, k: int):
        seeds = range(k * self.chunk, min((k + 1) * self.chunk, self.size))
        triplets = [world.triplet(self.seed * 10_000_019 + s, self.resolution) for s in seeds]
        rows = [attribute_labels(t.product, t.scene) for t in triplets]
        return (to_uint8_tensor([t.target for t in triplets]), to_uint8_tensor([t.reference for t in triplets]),
                torch.tensor([world.CAPTIONS.index(t.caption) for t in triplets]),
                {h: torch.tensor([r[h] for r in rows]) for h in HEADS},
                torch.from_numpy(np.stack([t.mask for t in triplets])))


def render_pool(size: int, seed: int, workers: int = 0, chunk: int = 512, resolution: int = RESOLUTION) -> WorldPool:
    """The first `size` triplets of the world for `seed` (training instances only); the same for any `workers`."""
    loader = torch.utils.data.DataLoader(_PoolChunks(size, seed, chunk, resolution), batch_size=None,
                                         num_workers=workers)
    parts = list(loader)
    return WorldPool(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                     torch.cat([p[2] for p in parts]), {h: torch.cat([p[3][h] for p in parts]) for h in HEADS},
                     torch.cat([p[4] for p in parts]))


# --- the stages ---------------------------------------------------------------------------

class _Progress:
    """One optimiser step of a stage: its loss kept, logged at an interval, the stage timed."""

    def __init__(self, stage: str, optimizer: torch.optim.Optimizer, warmup: int = 0, log_every: int = 250):
        self.stage, self.optimizer, self.warmup, self.log_every = stage, optimizer, warmup, log_every
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.losses: list[float] = []
        self.started = time.perf_counter()

    def step(self, loss: torch.Tensor) -> None:
        n = len(self.losses)
        if self.warmup:  # linear warm-up, then constant
            for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = lr * min(1.0, (n + 1) / self.warmup)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        if n % self.log_every == 0:
            logger.info("%s step %d loss %.4f (%.0f s)", self.stage, n, self.losses[-1], self.seconds)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict:
        tail = self.losses[-100:]
        return dict(steps=len(self.losses), seconds=round(self.seconds, 1), first_loss=self.losses[0],
                    final_loss=sum(tail) / len(tail), losses_every_50=self.losses[::50])


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(pool: WorldPool, steps: StageSteps, device: torch.device) -> tuple[AutoencoderKL, dict]:
    torch.manual_seed(steps.seed)
    vae = make_vae().to(device).train()
    progress = _Progress("vae", torch.optim.AdamW(vae.parameters(), lr=steps.learning_rate))
    g = torch.Generator().manual_seed(steps.seed)
    half = steps.batch_size // 2
    for _ in range(steps.vae_steps):
        images = pixels(torch.cat([pool.targets[pool.sample(g, half)], pool.references[pool.sample(g, half)]]))
        with _autocast(device):
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
        progress.step(F.l1_loss(reconstruction.float(), images) + 1e-6 * posterior.kl().float().mean())
    vae.eval()
    with torch.no_grad():  # SD's convention: scaled latents have about unit variance
        sample = pixels(pool.targets[pool.sample(g, 1024)])
        std = vae.encode(sample).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, progress.summary()


def caption_tokens(tokenizer, captions, device) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> CLIP's normalised pixels."""
    mean = torch.tensor(CLIP_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=images.device)[:, None, None]
    return ((images + 1) / 2 - mean) / std


def train_clip(pool: WorldPool, steps: StageSteps, device: torch.device) -> tuple[CLIPModel, dict]:
    torch.manual_seed(steps.seed + 1)
    tokenizer = tiny_tokenizer()
    clip = make_clip(tokenizer).to(device).train()
    progress = _Progress("clip", torch.optim.AdamW(clip.parameters(), lr=steps.learning_rate))
    tokens = caption_tokens(tokenizer, world.CAPTIONS, device)  # all 48 captions, every step
    g = torch.Generator().manual_seed(steps.seed + 1)
    for _ in range(steps.clip_steps):
        index = pool.sample(g, steps.batch_size)
        captions = pool.captions[index]
        with _autocast(device):
            logits = clip(input_ids=tokens, pixel_values=clip_pixels(pixels(pool.targets[index]))).logits_per_image
        logits = logits.float()  # (B, 48)
        image_loss = F.cross_entropy(logits, captions)
        # Caption -> images: every image carrying the caption is a positive (uniform target).
        present = captions.unique()
        positives = (captions[None, :] == present[:, None]).float()
        text_loss = -(positives / positives.sum(1, keepdim=True) * logits.T[present].log_softmax(1)).sum(1).mean()
        progress.step((image_loss + text_loss) / 2)
    return clip.eval(), progress.summary()


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())  # the same modules, without the CLIPModel prefix
    return encoder.eval()


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pool: WorldPool, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every pool scene, computed once for the whole UNet stage."""
    means, stds = [], []
    for start in range(0, len(pool), batch):
        posterior = vae.encode(pixels(pool.targets[start : start + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def product_weights(masks: torch.Tensor, latent_size: int, weight: float) -> torch.Tensor:
    """(N, 1, h, w) loss weights per latent pixel: 1 on the scene, `weight` where the product covers the
    pixel's whole block of image pixels, in between at its edges. (The loss divides by the batch's
    mean weight, so that it keeps its scale.)"""
    coverage = F.avg_pool2d(masks[:, None].float(), masks.shape[-1] // latent_size)
    return 1 + (weight - 1) * coverage


def train_unet(pool: WorldPool, steps: StageSteps, vae: AutoencoderKL, text_encoder: CLIPTextModel,
               device: torch.device, ema_decay: float = 0.999) -> tuple[UNet2DConditionModel, dict]:
    torch.manual_seed(steps.seed + 2)
    unet = make_unet().to(device).train()
    ema = make_unet().to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    vae, text_encoder = vae.to(device).eval(), text_encoder.to(device).eval()
    with torch.no_grad():  # 48 captions and the empty one: encoded once, looked up per sample
        table = text_encoder(caption_tokens(tiny_tokenizer(), world.CAPTIONS + ("",), device))[0]
    means, stds = encode_pool(vae, pool)
    weights = product_weights(pool.masks, means.shape[-1], steps.product_weight)
    scale = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(scheduler().config)
    progress = _Progress("unet", torch.optim.AdamW(unet.parameters(), lr=steps.learning_rate), warmup=500)
    g = torch.Generator().manual_seed(steps.seed + 3)
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    for _ in range(steps.unet_steps):
        index = pool.sample(g, steps.unet_batch_size)
        b = len(index)
        captions = torch.where(torch.rand(b, generator=g).to(device) < 0.1, EMPTY, pool.captions[index])
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=g).to(device)) * scale
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g).to(device)
        with _autocast(device):
            prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=table[captions]).sample
        weight = weights[index]
        error = (prediction.float() - noise_scheduler.get_velocity(latents, noise, t)) ** 2
        progress.step((weight * error).mean() / weight.mean())
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_decay)
    return ema.eval(), progress.summary()


def train_classifier(pool: WorldPool, steps: StageSteps, vae: AutoencoderKL,
                     device: torch.device) -> tuple[AttributeClassifier, dict]:
    torch.manual_seed(steps.seed + 4)
    classifier = AttributeClassifier(RESOLUTION).to(device).train()
    vae = vae.to(device).eval()
    progress = _Progress("classifier", torch.optim.AdamW(classifier.parameters(), lr=1e-3), warmup=200)
    g = torch.Generator().manual_seed(steps.seed + 4)
    half = steps.batch_size // 2
    for _ in range(steps.classifier_steps):
        index = pool.sample(g, steps.batch_size)
        images = pixels(pool.targets[index])
        with torch.no_grad():  # half the batch as the decoder draws it: generated shots look like that
            images[:half] = vae.decode(vae.encode(images[:half]).latent_dist.sample()).sample.clamp(-1, 1)
        with _autocast(device):
            loss = classifier.loss(images, {h: pool.labels[h][index] for h in HEADS})
        progress.step(loss.float())
    return classifier.eval(), progress.summary()


def train_adapters(base: Path, output: Path, preset: str, steps: StageSteps) -> dict:
    """Adapters for `preset` on world triplets, with the platform's trainer; the result in `output`."""
    from dreamcache.training import TrainConfig, Trainer

    run = output.parent / "runs" / output.name
    config = TrainConfig(base_model=str(base), manifest=world.WORLD_MANIFEST, world_pool=steps.pool_size,
                         output_dir=str(run), preset=preset, batch_size=steps.adapter_batch_size,
                         learning_rate=steps.adapter_learning_rate, max_steps=steps.adapter_steps,
                         data_workers=steps.workers, seed=steps.seed, log_every=50,
                         mixed_precision="bf16" if torch.cuda.is_available() else "no",
                         checkpoint_every=max(1, steps.adapter_steps // 10),
                         validate_every=max(1, steps.adapter_steps // 20))
    started = time.perf_counter()
    final = Trainer(config).train(resume="latest")  # an interrupted stage goes on from its last checkpoint
    shutil.copytree(final, output, dirs_exist_ok=True)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    return dict(steps=steps.adapter_steps, seconds=round(time.perf_counter() - started, 1), preset=preset,
                first_loss=losses[0], final_loss=losses[-1], logged_losses=losses,
                cache_effect=[[r["step"], r["cache_effect"]] for r in log if "cache_effect" in r])


def save_pipeline(vae, clip: CLIPModel, unet, directory: Path) -> Path:
    """The trained model as a diffusers Stable Diffusion directory (fp16 weights), plus the CLIP scorer."""
    from dreamcache.pipeline import DreamCachePipeline

    pipe = DreamCachePipeline(vae=vae, text_encoder=text_encoder_of(clip), tokenizer=tiny_tokenizer(), unet=unet,
                              scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(directory / "base")
    clip.to(torch.float16).save_pretrained(directory / "clip")
    tiny_tokenizer().save_pretrained(directory / "clip")
    return directory


# --- all of it, resumable by stage --------------------------------------------------------

ADAPTERS = {"adapter": "default", "adapter-middle": "middle"}  # output folder -> preset


def train_world_model(output: Path, steps: StageSteps, device: torch.device,
                      adapters: tuple[str, ...] = tuple(ADAPTERS)) -> dict:
    """Every stage not yet done in `output`; returns the training record (also `output/training.json`).

    `adapters` names the adapter folders to train (the base stages always come first)."""
    output.mkdir(parents=True, exist_ok=True)
    record_path = output / "training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.update(config=asdict(steps), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__)
    stages = record.setdefault("stages", {})

    def done(name: str, summary: dict) -> None:
        if record_path.exists():  # another process may have finished a stage meanwhile (adapters in parallel)
            stages.update({k: v for k, v in json.loads(record_path.read_text()).get("stages", {}).items()
                           if k not in stages})
        stages[name] = summary
        record_path.write_text(json.dumps(record, indent=1) + "\n")

    base_done = all((output / name).exists() for name in ("base", "classifier"))
    if not base_done:
        _train_base(output, steps, device, done)
    for name in adapters:
        if not (output / name).exists():
            done(name, train_adapters(output / "base", output / name, ADAPTERS[name], steps))
    return record


def _train_base(output: Path, steps: StageSteps, device: torch.device, done) -> None:
    stage_dir = output / "stages"
    started = time.perf_counter()
    pool = render_pool(steps.pool_size, steps.seed, steps.workers).to(device)
    done("pool", dict(triplets=len(pool), seconds=round(time.perf_counter() - started, 1)))

    def load_or_train(name: str, model_class, train):
        if (stage_dir / name).exists():
            return model_class.from_pretrained(stage_dir / name).to(device).eval()
        model, summary = train(pool, steps, device)
        model.save_pretrained(stage_dir / name)
        done(name, summary)
        return model

    vae = load_or_train("vae", AutoencoderKL, train_vae)
    clip = load_or_train("clip", CLIPModel, train_clip)
    if not (output / "base").exists():
        unet, summary = train_unet(pool, steps, vae, text_encoder_of(clip), device)
        done("unet", summary)
        save_pipeline(vae.float(), clip.float(), unet.float(), output)
    if not (output / "classifier").exists():
        classifier, summary = train_classifier(pool, steps, vae.float(), device)
        classifier.save_pretrained(output / "classifier")
        done("classifier", summary)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the procedural world's model (docs/toy-world.md).")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for field, value in asdict(StageSteps()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help=f"adapter folders to train: {', '.join(ADAPTERS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes in every stage
    steps = StageSteps(**{f: getattr(args, f) for f in asdict(StageSteps())})
    adapters = tuple(a for a in args.adapters.split(",") if a)
    train_world_model(args.output, steps, torch.device(args.device), adapters)


if __name__ == "__main__":
    main()
