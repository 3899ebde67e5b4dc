"""Training the project's own small Stable-Diffusion-architecture model on the procedural world.

Stages, run in order, each saving its result so that a later call resumes after the last finished one:

1. **Pool**: N triplets rendered once by worker processes, saved as arrays beside the model (so a
   resumed call or another process loads them) and kept on the GPU as uint8.
2. **VAE** (`AutoencoderKL`, 128 px -> 32x32x4 latents, 4x downsampling): L1 reconstruction + a
   small KL term, on scenes and references; its scaling factor gives unit-variance latents, as SD's.
3. **CLIP** (`CLIPModel`, a ViT over 16 px patches and a text transformer over the byte-level
   tokenizer): each image against all 48 captions, each caption's positives every image that
   carries it (no false negatives). Its text tower conditions the UNet; the whole model is the toy
   world's CLIP scorer (CLIP-T, CLIP-I, MCLIP-I).
4. **UNet** (`UNet2DConditionModel` in Stable Diffusion's layout: four levels, cross-attention in
   three down and three up blocks, two layers per block, 40-channel heads as SD 1.5's), so that the
   default preset selects the middle transformer and decoder positions 1, 3, 5, 7 at four
   resolutions exactly as on SD 1.5/2.1. v-prediction at zero terminal SNR (`scheduler()`),
   captions dropped 10% of the time; the exported weights are an EMA.
5. **Classifier**: the attribute classifier that measures fidelity (`dreamcache.world.classifier`),
   on scenes and on their VAE round trips (so that it reads the decoder's images as well as renders).
6. **Adapters**: the platform's own trainer (`dreamcache.training.trainer`) on the pool, references augmented
   on the GPU, for the default preset and, for the paper's placement ablation, the middle-only preset.

Every stage runs data-parallel under `accelerate launch` (one process per GPU: each takes its share
of the global batch, gradients are averaged) and in one process anywhere else. A stage stops at its
step count or its time budget (`*_minutes`), whichever comes first; `training.json` records the steps
it ran. The result is a plain diffusers directory (`base/`) plus adapter directories, the CLIP scorer
and the classifier, loaded by the same code paths as real Stable Diffusion and its scorers.

    python -m dreamcache.world.model --output models/world --workers 14
    accelerate launch --multi_gpu --num_processes 2 -m dreamcache.world.model --output models/world --workers 14
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from dreamcache.core.architectures import tiny_tokenizer
from dreamcache.training.schedule import lr_factor, stage_progress
from dreamcache.world import scene as world
from dreamcache.world.classifier import HEADS, AttributeClassifier
from dreamcache.world.pool import PoolTriplets, WorldPool, pixels, render_pool

logger = logging.getLogger(__name__)

EMPTY = len(world.CAPTIONS)  # the index of the empty caption in the UNet's text table


@dataclass
class WorldModelConfig:
    """The model's sizes and every stage's length and optimiser settings. The defaults are the shipped
    model's: the step counts its stages ran on two H200s under time budgets (bench/results/
    world_attempt4_h200x2.json), so that one command retrains it on any number of GPUs."""

    resolution: int = 128
    unet_channels: int = 40  # SD's (C, 2C, 4C, 4C) with C = 40: 13.6M parameters, 40-channel heads
    vae_channels: int = 32  # (C, 2C, 4C): its decoder runs at full resolution, the CPU's costliest part
    pool_size: int = 120_000  # rendered triplets every stage draws from (training instances only)
    batch_size: int = 256  # global batch of the VAE, CLIP and classifier stages
    vae_steps: int = 1070
    clip_steps: int = 1210
    unet_steps: int = 2150
    unet_batch_size: int = 1024
    # The loss weight of the product's pixels against the scene's. Five times, at 64 px, lifted the
    # adapters' cache effect and worsened the text-only colour spread (docs/toy-world.md); at 128 px
    # the product covers more of the shot, and a mild weight is kept.
    product_weight: float = 2.0
    classifier_steps: int = 1990
    # A hundred times the paper's learning rate (1e-5, for 200k steps) gets the cache's effect on the
    # loss to its plateau in minutes (docs/toy-world.md); the shipped adapters stopped before it.
    adapter_steps: int = 587
    middle_adapter_steps: int = 134  # the placement ablation's adapters
    adapter_batch_size: int = 1024
    learning_rate: float = 3e-4
    adapter_learning_rate: float = 1e-3
    # Time budgets in minutes (0: none): a stage stops at its steps or its budget, whichever comes first.
    vae_minutes: float = 0.0
    clip_minutes: float = 0.0
    unet_minutes: float = 0.0
    classifier_minutes: float = 0.0
    adapter_minutes: float = 0.0
    middle_adapter_minutes: float = 0.0
    seed: int = 0
    workers: int = 0  # processes rendering the world (use most CPU cores on a GPU machine); 0: none at all
    # A finished model directory (e.g. dreamcache/assets/product-world) to continue from: every stage
    # starts from its weights instead of fresh ones, and a stage given 0 steps keeps them as they are,
    # so that the device time of several sessions adds up to one model. Empty: train from scratch.
    init_from: str = ""
    # With init_from: train the adapters from fresh weights on the continued base, as the paper's
    # placement ablation compares presets at equal training (docs/toy-world.md, "The models").
    fresh_adapters: bool = False
    # With init_from: train only the VAE's decoder. The encoder stays as it is, so the latents the UNet
    # and the adapters learned keep their meaning and scale, and only detail the decoder loses (the VAE
    # round trip's gate, docs/toy-world.md) is trained for.
    vae_decoder_only: bool = False
    # Speed levers, comma-separated (BENCHMARKS.md, "Training throughput"): `compile` (torch.compile of
    # the UNet stage's model; the adapter stage runs eager), `channels-last`, `fused-adamw`, and
    # `latents-once` (the adapter stage's target latents encoded once, as the UNet stage's are). Each
    # applies on CUDA only, so CPU runs are the eager ones; "none" is the fourth training's settings.
    levers: str = "compile,channels-last,fused-adamw,latents-once"
    # The learning rate along every stage (dreamcache/training/schedule.py): "constant", the first six
    # trainings'; or "cosine", falling to a tenth by the stage's steps or minutes, whichever ends it.
    lr_schedule: str = "constant"

    def __post_init__(self):
        unknown = self.lever_names() - LEVERS
        if unknown:
            raise ValueError(f"unknown speed lever(s) {', '.join(sorted(unknown))}: choose from {', '.join(sorted(LEVERS))} or none")
        lr_factor(self.lr_schedule, 0.0)  # a clear error for an unknown schedule, before any stage starts
        if self.vae_decoder_only and not self.init_from:
            raise ValueError("vae_decoder_only trains the decoder of a finished model's VAE: give init_from as well")

    def lever_names(self) -> set[str]:
        return {name.strip() for name in self.levers.split(",") if name.strip() and name.strip() != "none"}

    def levers_on(self, device: torch.device) -> set[str]:
        """The levers in force on `device`: none off CUDA."""
        return self.lever_names() if device.type == "cuda" else set()


LEVERS = {"compile", "channels-last", "fused-adamw", "latents-once"}


def make_vae(config: WorldModelConfig) -> AutoencoderKL:
    c = config.vae_channels
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(c, 2 * c, 4 * c),
                         layers_per_block=2, latent_channels=4, norm_num_groups=16, sample_size=config.resolution)


def make_clip(tokenizer, config: WorldModelConfig) -> CLIPModel:
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=config.resolution, patch_size=config.resolution // 8, hidden_size=128,
                  intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128))


def make_unet(config: WorldModelConfig) -> UNet2DConditionModel:
    c = config.unet_channels
    channels = (c, 2 * c, 4 * c, 4 * c)
    return UNet2DConditionModel(sample_size=config.resolution // 4, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                block_out_channels=channels, layers_per_block=2,
                                # diffusers reads this as the number of heads (a known misnomer): 40 channels a head
                                attention_head_dim=tuple(max(1, ch // 40) for ch in channels),
                                cross_attention_dim=128, norm_num_groups=8)


def scheduler() -> DDIMScheduler:
    """SD's noise levels rescaled to zero terminal SNR, with v-prediction and trailing timesteps.

    SD's own schedule ends at SNR 0.0047: trained on it, a small latent's low frequencies (a product's
    colour) still show through the noise at t = 999, so the model learns to read them there, and from
    pure noise at sampling time it draws one colour for nearly every product (docs/toy-world.md,
    second training). Zero terminal SNR needs v-prediction (an epsilon target carries no information
    at t = 999); both are scheduler settings that the same pipeline code reads, as for SD 2.x models.
    """
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing")


# --- one process or many ------------------------------------------------------------------------

class Processes:
    """This process's place among the training processes (one, or one per GPU under accelerate)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank, self.count = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over the processes (gradients averaged at backward), or the model itself in one process."""
        if self.count == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index]
                                                         if self.device.type == "cuda" else None)

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes, the same number on each."""
        if self.count == 1:
            return value
        return self.accelerator.reduce(torch.tensor(float(value), device=self.device), reduction="mean").item()

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any (so that all stop at the same step)."""
        if self.count == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.device), reduction="sum").item() > 0)

    def share(self, global_batch: int) -> int:
        if global_batch % self.count:
            raise ValueError(f"a global batch of {global_batch} does not divide over {self.count} processes")
        return global_batch // self.count

    def generator(self, seed: int) -> torch.Generator:
        """Each process draws its own samples."""
        return torch.Generator().manual_seed(seed * 1000 + self.rank)


class _Progress:
    """One optimiser step of a stage: its loss kept, logged at an interval, the stage timed and stopped
    at its step count or time budget (every process at the same step)."""

    def __init__(self, stage: str, optimizer: torch.optim.Optimizer, processes: Processes, steps: int,
                 minutes: float = 0, warmup: int = 0, log_every: int = 250, batch: int = 0,
                 schedule: str = "constant"):
        self.stage, self.optimizer, self.processes = stage, optimizer, processes
        self.steps, self.minutes, self.warmup, self.log_every = steps, minutes, warmup, log_every
        self.schedule, self.progress = schedule, 0.0
        self.batch = batch  # global samples per step, for the throughput
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.losses: list[float] = []
        self.started = time.perf_counter()
        # Throughput is timed from this step on: the first steps compile and tune kernels.
        self.timed_from, self.timed_at = min(20, steps // 5), None

    def __iter__(self):
        for n in range(self.steps):
            if self.minutes and n % 10 == 0 and self.processes.any(self.seconds > 60 * self.minutes):
                logger.info("%s: time budget of %g minutes reached at step %d", self.stage, self.minutes, n)
                return
            if self.schedule != "constant" and n % 10 == 0:  # with the budget's check: one exchange
                self.progress = self.processes.mean(stage_progress(n, self.steps, self.seconds, self.minutes))
            yield n

    def step(self, loss: torch.Tensor) -> None:
        n = len(self.losses)
        if n == self.timed_from:
            self.timed_at = self._synchronized_time()
        if self.warmup or self.schedule != "constant":  # linear warm-up, then the schedule
            factor = min(1.0, (n + 1) / self.warmup) if self.warmup else 1.0
            for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = lr * factor * lr_factor(self.schedule, self.progress)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # Kept on the device: reading each loss back would wait for the GPU every step.
        self.losses.append(loss.detach())
        if n % self.log_every == 0:
            logger.info("%s step %d loss %.4f (%.0f s)", self.stage, n, loss.item(), self.seconds)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def _synchronized_time(self) -> float:
        if self.processes.device.type == "cuda":
            torch.cuda.synchronize(self.processes.device)
        return time.perf_counter()

    def summary(self) -> dict:
        if not self.losses:  # a stage given no steps: the weights it started from, unchanged
            return dict(steps=0, seconds=0.0, processes=self.processes.count)
        losses = torch.stack(self.losses).float().cpu().tolist()
        tail = losses[-100:]
        summary = dict(steps=len(losses), seconds=round(self.seconds, 1), processes=self.processes.count,
                       first_loss=losses[0], final_loss=sum(tail) / len(tail), losses_every_50=losses[::50])
        timed = len(losses) - self.timed_from
        if self.batch and self.timed_at is not None and timed > 0:
            summary["samples_per_s"] = round(self.batch * timed / (self._synchronized_time() - self.timed_at), 1)
        return summary


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _continued(config: WorldModelConfig, part: str, load):
    """`part` of the model named by `config.init_from` (e.g. "base/unet"), loaded with `load` in
    float32, or None when training from scratch."""
    if not config.init_from:
        return None
    folder = Path(config.init_from) / part
    if not folder.is_dir():
        raise FileNotFoundError(f"init_from {config.init_from} has no {part}/: continue from a finished world "
                                "model directory (base/, clip/, classifier/, adapter/), such as dreamcache/assets/product-world")
    return load(folder).float()


def _adamw(params, lr: float, config: WorldModelConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel updates every tensor in one launch; the default launches a few per tensor.
    return torch.optim.AdamW(params, lr=lr, fused="fused-adamw" in config.levers_on(device))


def _fast(model: torch.nn.Module, p: Processes, config: WorldModelConfig) -> torch.nn.Module:
    """`model` (converted in place) in channels-last memory, where convolutions skip a layout change
    each, then wrapped for the processes and compiled, which fuses the GroupNorm and SiLU chains that
    dominate at these widths."""
    levers = config.levers_on(p.device)
    if "channels-last" in levers:
        model.to(memory_format=torch.channels_last)
    model = p.wrap(model)
    return torch.compile(model) if "compile" in levers else model


def _layout(images: torch.Tensor, config: WorldModelConfig) -> torch.Tensor:
    """Inputs in the memory format of the model they feed."""
    return images.contiguous(memory_format=torch.channels_last) if "channels-last" in config.levers_on(images.device) else images


# --- the stages ---------------------------------------------------------------------------

def train_vae(pool: WorldPool, config: WorldModelConfig, p: Processes) -> tuple[AutoencoderKL, dict]:
    torch.manual_seed(config.seed)  # the same initial weights on every process
    vae = _continued(config, "base/vae", AutoencoderKL.from_pretrained)
    vae = (vae if vae is not None else make_vae(config)).to(p.device).train()
    if config.vae_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    trained = [w for w in vae.parameters() if w.requires_grad]
    model = _fast(_VaeRoundTrip(vae), p, config)
    # Continued, the VAE warms up: Adam's first steps move every weight by about the learning rate at
    # once, which set a trained decoder back (held-out L1 0.064 -> 0.085 after one step at 1e-4, batch 8;
    # docs/toy-world.md, "What the next training should change").
    progress = _Progress("vae", _adamw(trained, config.learning_rate, config, p.device), p, config.vae_steps,
                         config.vae_minutes, warmup=100 if config.init_from else 0, batch=config.batch_size,
                         schedule=config.lr_schedule)
    g = p.generator(config.seed)
    half = p.share(config.batch_size) // 2
    for _ in progress:
        images = pixels(torch.cat([pool.targets[pool.sample(g, half)], pool.references[pool.sample(g, half)]]))
        with _autocast(p.device):
            reconstruction, kl = model(_layout(images, config))
        progress.step(F.l1_loss(reconstruction.float(), images) + 1e-6 * kl.float().mean())
    vae = vae.eval().to(memory_format=torch.contiguous_format).requires_grad_(True)
    if not progress.losses or config.vae_decoder_only:  # the encoder as it was: its latents, and their scale, stay the UNet's
        return vae, progress.summary()
    with torch.no_grad():  # SD's convention: scaled latents have about unit variance
        sample = pixels(pool.targets[pool.sample(torch.Generator().manual_seed(config.seed), 1024)])
        std = vae.encode(sample).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, progress.summary()


class _VaeRoundTrip(torch.nn.Module):
    """The VAE's training forward as one module call, so that DDP sees the encoder and decoder used."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        posterior = self.vae.encode(images).latent_dist  # a frozen encoder records no graph: nothing in it needs grad
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


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


def train_clip(pool: WorldPool, config: WorldModelConfig, p: Processes) -> tuple[CLIPModel, dict]:
    torch.manual_seed(config.seed + 1)
    tokenizer = tiny_tokenizer()
    clip = _continued(config, "clip", CLIPModel.from_pretrained)
    clip = (clip if clip is not None else make_clip(tokenizer, config)).to(p.device).train()
    model = p.wrap(clip)
    progress = _Progress("clip", _adamw(clip.parameters(), config.learning_rate, config, p.device), p,
                         config.clip_steps, config.clip_minutes, batch=config.batch_size, schedule=config.lr_schedule)
    tokens = caption_tokens(tokenizer, world.CAPTIONS, p.device)  # all 48 captions, every step
    g = p.generator(config.seed + 1)
    for _ in progress:
        index = pool.sample(g, p.share(config.batch_size))
        captions = pool.captions[index]
        with _autocast(p.device):
            logits = model(input_ids=tokens, pixel_values=clip_pixels(pixels(pool.targets[index]))).logits_per_image
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
    return encoder.to(clip.device).eval()


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pool: WorldPool, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every pool scene, computed once for the whole UNet stage."""
    means, stds = [], []
    for start in range(0, len(pool), batch):  # in float32: these are the UNet's targets for the whole stage
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


def train_unet(pool: WorldPool, config: WorldModelConfig, vae: AutoencoderKL, text_encoder: CLIPTextModel,
               p: Processes, ema_decay: float = 0.999) -> tuple[UNet2DConditionModel, dict]:
    torch.manual_seed(config.seed + 2)
    unet = _continued(config, "base/unet", UNet2DConditionModel.from_pretrained)
    # Continued, the EMA starts from the shipped (EMA) weights too, and the new steps average into it.
    unet = (unet if unet is not None else make_unet(config)).to(p.device).train()
    model = _fast(unet, p, config)
    ema = copy.deepcopy(unet).requires_grad_(False)  # in the same memory format: its update is elementwise
    vae, text_encoder = vae.to(p.device).eval(), text_encoder.to(p.device).eval()
    with torch.no_grad():  # 48 captions and the empty one: encoded once, looked up per sample
        table = text_encoder(caption_tokens(tiny_tokenizer(), world.CAPTIONS + ("",), p.device))[0]
    means, stds = encode_pool(vae, pool)
    weights = product_weights(pool.masks, means.shape[-1], config.product_weight)
    scale = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(scheduler().config)
    # A continued UNet needs no warm-up: its optimiser state is new, its weights are not.
    progress = _Progress("unet", _adamw(unet.parameters(), config.learning_rate, config, p.device), p,
                         config.unet_steps, config.unet_minutes, warmup=0 if config.init_from else 500,
                         batch=config.unet_batch_size, schedule=config.lr_schedule)
    g = p.generator(config.seed + 3)
    # Noise is drawn where it is used: megabytes a step, too many to make on the CPU and copy over.
    noise_g = torch.Generator(p.device).manual_seed(g.initial_seed())
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    b = p.share(config.unet_batch_size)
    for _ in progress:
        index = pool.sample(g, b)
        dropped = torch.rand(b, generator=noise_g, device=p.device) < 0.1
        captions = torch.where(dropped, EMPTY, pool.captions[index])
        latent_noise = torch.randn(means[index].shape, generator=noise_g, device=p.device)
        latents = (means[index] + stds[index] * latent_noise) * scale
        noise = torch.randn(latents.shape, generator=noise_g, device=p.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=noise_g, device=p.device)
        with _autocast(p.device):
            noisy = _layout(noise_scheduler.add_noise(latents, noise, t), config)
            prediction = model(noisy, t, encoder_hidden_states=table[captions]).sample
        weight = weights[index]
        error = (prediction.float() - noise_scheduler.get_velocity(latents, noise, t)) ** 2
        progress.step((weight * error).mean() / weight.mean())
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_decay)
    return ema.eval().to(memory_format=torch.contiguous_format), progress.summary()


def train_classifier(pool: WorldPool, config: WorldModelConfig, vae: AutoencoderKL,
                     p: Processes) -> tuple[AttributeClassifier, dict]:
    torch.manual_seed(config.seed + 4)
    classifier = _continued(config, "classifier", AttributeClassifier.from_pretrained)
    classifier = (classifier if classifier is not None else AttributeClassifier(config.resolution)).to(p.device).train()
    model = p.wrap(classifier)
    vae = vae.to(p.device).eval()
    progress = _Progress("classifier", _adamw(classifier.parameters(), 1e-3, config, p.device), p,
                         config.classifier_steps, config.classifier_minutes, warmup=0 if config.init_from else 200,
                         batch=config.batch_size, schedule=config.lr_schedule)
    g = p.generator(config.seed + 4)
    b = p.share(config.batch_size)
    for _ in progress:
        index = pool.sample(g, b)
        images = pixels(pool.targets[index])
        with torch.no_grad(), _autocast(p.device):  # half the batch as the decoder draws it: generated shots look so
            decoded = vae.decode(vae.encode(images[: b // 2]).latent_dist.sample()).sample
        images[: b // 2] = decoded.float().clamp(-1, 1)
        with _autocast(p.device):
            logits = model(images)
        loss = sum(F.cross_entropy(logits[h].float(), pool.labels[h][index], ignore_index=-100) for h in HEADS)
        progress.step(loss / len(HEADS))
    return classifier.eval(), progress.summary()


def train_adapters(base: Path, output: Path, preset: str, pool: WorldPool, config: WorldModelConfig,
                   accelerator, steps: int, minutes: float = 0) -> dict:
    """Adapters for `preset` on the pool, with the platform's trainer; the result in `output`."""
    from dreamcache.training.trainer import TrainConfig, Trainer

    run = output.parent / "runs" / output.name
    levers = config.levers_on(accelerator.device)
    init = _adapter_init(config, output.name)
    train_config = TrainConfig(base_model=str(base), output_dir=str(run), preset=preset,
                               init_adapter=str(init) if init else None,
                               channels_last="channels-last" in levers, fused_optimizer="fused-adamw" in levers,
                               batch_size=config.adapter_batch_size // accelerator.num_processes,
                               learning_rate=config.adapter_learning_rate, lr_schedule=config.lr_schedule,
                               max_steps=steps,
                               max_minutes=minutes or None,
                               # The pool lives on the GPU, and forked data workers must not touch it (CUDA
                               # cannot be re-initialised in a fork); drawing a sample's numbers is cheap.
                               data_workers=0, seed=config.seed,
                               log_every=50, mixed_precision="bf16" if torch.cuda.is_available() else "no",
                               checkpoint_every=max(1, steps // 10), validate_every=max(1, steps // 20))
    started = time.perf_counter()
    latents = None
    if "latents-once" in levers:  # the targets are not augmented: each one's posterior is the same every step
        vae = AutoencoderKL.from_pretrained(base / "vae").float().to(accelerator.device).eval()
        latents = encode_pool(vae, pool)
        del vae
    trainer = Trainer(train_config, accelerator=accelerator, dataset=PoolTriplets(pool, latents=latents))
    final = trainer.train(resume="latest")  # an interrupted stage goes on from its last checkpoint
    if accelerator.is_main_process:
        shutil.copytree(final, output, dirs_exist_ok=True)
    accelerator.wait_for_everyone()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    return dict(steps=trainer.step, seconds=round(time.perf_counter() - started, 1), preset=preset,
                processes=accelerator.num_processes, samples_per_s=_steady_rate(log, config.adapter_batch_size),
                first_loss=losses[0], final_loss=losses[-1], logged_losses=losses,
                cache_effect=[[r["step"], r["cache_effect"]] for r in log if "cache_effect" in r])


def _adapter_init(config: WorldModelConfig, name: str) -> Path | None:
    """The adapter folder `name` continues from: init_from's own, or None for fresh weights."""
    if not config.init_from or config.fresh_adapters:
        return None
    init = Path(config.init_from) / name
    if not init.is_dir():
        raise FileNotFoundError(f"init_from {config.init_from} has no {name}/ to continue: "
                                "pass --fresh-adapters to train it from fresh weights")
    return init


def _steady_rate(log: list[dict], batch: int) -> float:
    """Samples per second between the log record a fifth of the way in and the last (the first steps
    tune kernels); the whole run's rate when it logged too little for that."""
    start = next((r for r in log if r["step"] >= log[-1]["step"] / 5 and r is not log[-1]), None)
    if start is None:
        return round(log[-1]["samples_per_s"], 1)
    end = log[-1]
    return round(batch * (end["step"] - start["step"]) / (end["elapsed_s"] - start["elapsed_s"]), 1)


def save_pipeline(vae, clip: CLIPModel, unet, directory: Path) -> Path:
    """The trained model as a diffusers Stable Diffusion directory (fp16 weights), plus the CLIP scorer
    with its processor (so that the platform's scorer loads it like any CLIP)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from dreamcache.core.pipeline import DreamCachePipeline

    pipe = DreamCachePipeline(vae=vae, text_encoder=text_encoder_of(clip), tokenizer=tiny_tokenizer(), unet=unet,
                              scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(directory / "base")
    clip.to(torch.float16).save_pretrained(directory / "clip")
    size = clip.config.vision_config.image_size
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)), tiny_tokenizer())
    processor.save_pretrained(directory / "clip")
    return directory


# --- all of it, resumable by stage --------------------------------------------------------

ADAPTERS = {"adapter": "default", "adapter-middle": "middle"}  # output folder -> preset
# Output folder -> its steps and time budget fields.
LENGTHS = {"adapter": ("adapter_steps", "adapter_minutes"), "adapter-middle": ("middle_adapter_steps", "middle_adapter_minutes")}


def train_world_model(output: Path, config: WorldModelConfig, accelerator=None,
                      adapters: tuple[str, ...] = tuple(ADAPTERS)) -> dict:
    """Every stage not yet done in `output`; returns the training record (also `output/training.json`).

    `adapters` names the adapter folders to train (the base stages always come first). Under
    `accelerate launch` every process runs this; the main process writes the files.
    """
    from accelerate import Accelerator

    for name in adapters:  # a missing adapter to continue is named before any stage starts
        _adapter_init(config, name)
    accelerator = accelerator or Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    p = Processes(accelerator)
    output.mkdir(parents=True, exist_ok=True)
    record_path = output / "training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    device_name = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else "cpu"
    record.update(config=asdict(config), device=f"{device_name} x{p.count}", torch=torch.__version__)
    stages = record.setdefault("stages", {})
    if "earlier_sessions" not in record:  # what the model continued from had already seen
        before = Path(config.init_from) / "training.json" if config.init_from else None
        earlier = json.loads(before.read_text())["sessions"] if before and before.exists() else []
        if config.fresh_adapters:  # the adapters start over: what earlier ones saw is not theirs
            earlier = [dict(s, samples={k: v for k, v in s["samples"].items() if k not in ADAPTERS}) for s in earlier]
        record["earlier_sessions"] = earlier

    def done(name: str, summary: dict) -> None:
        if p.main:
            if record_path.exists():  # another job may have finished a stage meanwhile (adapters side by side)
                on_disk = json.loads(record_path.read_text()).get("stages", {})
                stages.update({k: v for k, v in on_disk.items() if k not in stages})
            stages[name] = summary
            record["sessions"] = record["earlier_sessions"] + [dict(device=record["device"], samples=_samples(config, stages))]
            record["samples"] = {stage: sum(s["samples"].get(stage, 0) for s in record["sessions"])
                                 for stage in _BATCH_FIELDS}
            record_path.write_text(json.dumps(record, indent=1) + "\n")
        p.barrier()

    started = time.perf_counter()
    pool = render_pool(config.pool_size, config.seed, config.workers, resolution=config.resolution,
                       directory=output / "pool", rank=p.rank, processes=p.count, barrier=p.barrier).to(p.device)
    if "pool" not in stages:
        done("pool", dict(triplets=len(pool), seconds=round(time.perf_counter() - started, 1)))
    if not all((output / name).exists() for name in ("base", "classifier")):
        _train_base(output, config, pool, p, done)
    for name in adapters:
        if not (output / name).exists():
            steps, minutes = (getattr(config, field) for field in LENGTHS[name])
            init = _adapter_init(config, name)
            if init is not None and steps == 0 and not minutes:  # continued for no steps: kept as they are
                if p.main:
                    keep_adapters(init, output / "base", output / name)
                done(name, dict(steps=0, preset=ADAPTERS[name], kept_from=str(init)))
            else:
                done(name, train_adapters(output / "base", output / name, ADAPTERS[name], pool, config, accelerator,
                                          steps, minutes))
    return record


def keep_adapters(init: Path, base: Path, output: Path) -> None:
    """`init`'s adapters copied to `output`, their config naming `base` as the base they now go with. Only
    the UNet and the VAE's encoder shape what they see, so after a decoder trained alone they are valid as
    they are; after UNet training they are what a later session continues from."""
    from dreamcache.core.adapter_config import CONFIG_NAME
    from dreamcache.core.weights import base_identity

    shutil.copytree(init, output)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    vae = AutoencoderKL.from_pretrained(base / "vae")
    config = json.loads((output / CONFIG_NAME).read_text())
    config["base_model"] = base_identity(base, unet, vae)
    (output / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


# Each stage's global batch, to count the samples it has seen across sessions.
_BATCH_FIELDS = {"vae": "batch_size", "clip": "batch_size", "unet": "unet_batch_size", "classifier": "batch_size",
                 "adapter": "adapter_batch_size", "adapter-middle": "adapter_batch_size"}


def _samples(config: WorldModelConfig, stages: dict) -> dict[str, int]:
    """Samples each stage trained on in this session."""
    return {name: stages[name].get("steps", 0) * getattr(config, field)
            for name, field in _BATCH_FIELDS.items() if name in stages}


def _train_base(output: Path, config: WorldModelConfig, pool: WorldPool, p: Processes, done) -> None:
    stage_dir = output / "stages"

    def load_or_train(name: str, model_class, train):
        if (stage_dir / name).exists():
            return model_class.from_pretrained(stage_dir / name).to(p.device).eval()
        model, summary = train(pool, config, p)
        if p.main:
            model.save_pretrained(stage_dir / name)
        done(name, summary)
        return model

    vae = load_or_train("vae", AutoencoderKL, train_vae)
    clip = load_or_train("clip", CLIPModel, train_clip)
    if not (output / "base").exists():
        unet, summary = train_unet(pool, config, vae, text_encoder_of(clip), p)
        if p.main:
            save_pipeline(vae.float(), clip.float(), unet.float(), output)
        done("unet", summary)
    if not (output / "classifier").exists():
        classifier, summary = train_classifier(pool, config, vae.float(), p)
        if p.main:
            classifier.save_pretrained(output / "classifier")
        done("classifier", summary)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the procedural world's model (docs/toy-world.md).")
    parser.add_argument("--output", type=Path, required=True)
    for field in fields(WorldModelConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):  # type=bool would read "False" as true
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help=f"adapter folders to train: {', '.join(ADAPTERS)}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes in every stage
    config = WorldModelConfig(**{f.name: getattr(args, f.name) for f in fields(WorldModelConfig)})
    adapters = tuple(a for a in args.adapters.split(",") if a)
    train_world_model(args.output, config, adapters=adapters)


if __name__ == "__main__":
    main()
