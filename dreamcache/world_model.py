"""Training the project's own small Stable-Diffusion-architecture model on the procedural world.

Four stages, each a short function, run in order (and resumable by stage, each saving its result):

1. **VAE** (`AutoencoderKL`, 64 px -> 16x16x4 latents): reconstruction + a small KL term, on scenes
   and references.
2. **CLIP** (`CLIPModel`, small ViT and text transformer over the byte-level tokenizer): contrastive
   on (scene, caption). Its text tower conditions the UNet; the whole model is the toy world's
   CLIP-I / CLIP-T scorer.
3. **UNet** (`UNet2DConditionModel`, SD layout): text-conditioned noise prediction on scene latents,
   captions dropped 10% of the time for classifier-free guidance.
4. **Adapters**: the platform's own trainer (`dreamcache.training`) on world triplets (`world://`).

The result is a plain diffusers directory (`save_pretrained`) plus an adapter directory, loaded by
the same code path as real Stable Diffusion.

    python -m dreamcache.world_model --output models/world --device cuda [--stage vae|clip|unet|all]
"""

from __future__ import annotations

import argparse
import json
import logging
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

logger = logging.getLogger(__name__)

RESOLUTION = 64


@dataclass
class StageSteps:
    """Optimiser steps and batch size per stage (the defaults are for one H100)."""

    vae_steps: int = 3000
    clip_steps: int = 3000
    unet_steps: int = 12000
    batch_size: int = 128
    learning_rate: float = 3e-4
    seed: int = 0
    workers: int = 0  # data-loader processes rendering the world (use most CPU cores on a GPU machine)


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
                                block_out_channels=(64, 128, 256), layers_per_block=1, attention_head_dim=32,
                                cross_attention_dim=128, norm_num_groups=16)


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def world_batch(step: int, batch: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Scenes (B, 3, 64, 64) in [-1, 1], their captions, and references on white (B, 3, 64, 64)."""
    triplets = [world.triplet(seed * 10_000_019 + step * batch + i, RESOLUTION) for i in range(batch)]

    def pixels(images):
        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1

    return pixels([t.target for t in triplets]), [t.caption for t in triplets], pixels([t.reference for t in triplets])


class _WorldBatches(torch.utils.data.Dataset):
    """Batch `step` of a stage, rendered in a data-loader worker (rendering is the CPU-heavy part)."""

    def __init__(self, batch: int, seed: int, offset: int):
        self.batch, self.seed, self.offset = batch, seed, offset

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, step: int):
        return world_batch(step + self.offset, self.batch, self.seed)


def batches(steps: int, batch: int, seed: int, offset: int = 0, workers: int = 0):
    """World batches for steps 0..steps-1 of a stage, rendered ahead by `workers` processes."""
    return iter(torch.utils.data.DataLoader(_WorldBatches(batch, seed, offset), batch_size=None, sampler=range(steps),
                                            num_workers=workers, prefetch_factor=4 if workers else None))


class _Progress:
    """One optimiser step of a stage, its loss kept and logged at an interval."""

    def __init__(self, stage: str, optimizer: torch.optim.Optimizer, log_every: int):
        self.stage, self.optimizer, self.log_every = stage, optimizer, log_every
        self.losses: list[float] = []
        self.started = time.perf_counter()

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        if (len(self.losses) - 1) % self.log_every == 0:
            logger.info("%s step %d loss %.4f (%.0f s)", self.stage, len(self.losses) - 1, self.losses[-1],
                        time.perf_counter() - self.started)


def train_vae(steps: StageSteps, device: torch.device, log_every: int = 100) -> tuple[AutoencoderKL, list[float]]:
    torch.manual_seed(steps.seed)
    vae = make_vae().to(device).train()
    progress = _Progress("vae", torch.optim.AdamW(vae.parameters(), lr=steps.learning_rate), log_every)
    for scenes, _, references in batches(steps.vae_steps, steps.batch_size // 2, steps.seed, 0, steps.workers):
        images = torch.cat([scenes, references]).to(device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        progress.step(F.l1_loss(reconstruction, images) + 1e-6 * posterior.kl().mean())
    return vae.eval(), progress.losses


def _tokens(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def train_clip(steps: StageSteps, device: torch.device, log_every: int = 100) -> tuple[CLIPModel, list[float]]:
    torch.manual_seed(steps.seed + 1)
    tokenizer = tiny_tokenizer()
    clip = make_clip(tokenizer).to(device).train()
    progress = _Progress("clip", torch.optim.AdamW(clip.parameters(), lr=steps.learning_rate), log_every)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device)[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device)[:, None, None]
    for scenes, captions, _ in batches(steps.clip_steps, steps.batch_size, steps.seed, 1_000_000, steps.workers):
        pixels = ((scenes.to(device) + 1) / 2 - mean) / std
        progress.step(clip(input_ids=_tokens(tokenizer, captions, device), pixel_values=pixels, return_loss=True).loss)
    return clip.eval(), progress.losses


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())  # the same modules, without the CLIPModel prefix
    return encoder.eval()


def train_unet(steps: StageSteps, vae: AutoencoderKL, text_encoder: CLIPTextModel, device: torch.device,
               log_every: int = 100) -> tuple[UNet2DConditionModel, list[float]]:
    torch.manual_seed(steps.seed + 2)
    tokenizer = tiny_tokenizer()
    unet = make_unet().to(device).train()
    vae, text_encoder = vae.to(device).requires_grad_(False), text_encoder.to(device).requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(scheduler().config)
    progress = _Progress("unet", torch.optim.AdamW(unet.parameters(), lr=steps.learning_rate), log_every)
    g = torch.Generator().manual_seed(steps.seed + 3)
    for scenes, captions, _ in batches(steps.unet_steps, steps.batch_size, steps.seed, 2_000_000, steps.workers):
        captions = ["" if torch.rand((), generator=g) < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(scenes.to(device)).latent_dist.sample() * vae.config.scaling_factor
            text = text_encoder(_tokens(tokenizer, captions, device))[0]
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
        prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        progress.step(F.mse_loss(prediction, noise))
    return unet.eval(), progress.losses


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the procedural world's model (docs/toy-world.md).")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for field, value in asdict(StageSteps()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = StageSteps(**{f: getattr(args, f) for f in asdict(StageSteps())})
    device = torch.device(args.device)
    args.output.mkdir(parents=True, exist_ok=True)
    vae, vae_losses = train_vae(steps, device)
    clip, clip_losses = train_clip(steps, device)
    unet, unet_losses = train_unet(steps, vae, text_encoder_of(clip), device)
    save_pipeline(vae.float(), clip.float(), unet.float(), args.output)
    (args.output / "losses.json").write_text(json.dumps(dict(vae=vae_losses, clip=clip_losses, unet=unet_losses)))


if __name__ == "__main__":
    main()
