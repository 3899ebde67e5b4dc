"""Training DreamCache adapters: one loop for every scale (CPU, one GPU, many GPUs via accelerate).

The base UNet, VAE and text encoder are frozen; only the adapters train, with the standard
noise-prediction (or v-prediction) MSE at timesteps drawn uniformly. Each sample's cache is computed
on the fly from its reference by the base UNet at t = 1 (no gradient); its caption is dropped to
the empty prompt with probability 0.07; its reference gets the method's augmentations. AdamW at a
constant learning rate (1e-5 in the paper) or one that falls along a cosine (`lr_schedule`), gradient
accumulation, mixed precision and gradient checkpointing as options.

Every random draw of a step comes from generators seeded by (seed, step, sample), never from global
state: a resumed run repeats exactly the steps it would have taken, and N processes with batch B
see the same samples as one process with batch N x B.

    python -m dreamcache.training.trainer config.toml                                # one process
    accelerate launch --num_processes 4 -m dreamcache.training.trainer config.toml   # DDP
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, Field
from torch import nn

from dreamcache.core.adapter import DreamCacheAdapter, LayerMemory, apply_dreamcache, set_memory
from dreamcache.core.cache import extract_features
from dreamcache.training.data import Loader, ManifestReport, TripletDataset, load_manifest, read_bytes
from dreamcache.training.schedule import lr_factor, stage_progress
from dreamcache.core.layers import resolve_preset
from dreamcache.core.weights import (
    FINGERPRINT_PREFIX, AdapterConfig, base_identity, load_adapters, read_adapter_config, save_adapters,
)

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


class TrainConfig(BaseModel):
    """A training run; every field has the paper's or a sensible default. Read from TOML."""

    base_model: str = Field(description="Base Stable Diffusion pipeline: a diffusers directory or hub id.")
    manifest: str | None = Field(default=None, description="Triplet manifest (JSONL): target, reference or mask, "
                                 "caption. Not needed when the trainer is handed a dataset.")
    output_dir: str = Field(description="Checkpoints, the final adapter, logs and validation images go here.")
    preset: str = "default"
    init_adapter: str | None = Field(default=None, description="Start from these adapter weights.")
    resolution: int | None = Field(default=None, description="Training resolution; default: the model's.")
    batch_size: int = Field(default=12, ge=1, description="Samples per process per micro-step (the paper: 12).")
    gradient_accumulation: int = Field(default=1, ge=1, description="Micro-steps per optimiser step (the paper: 4).")
    learning_rate: float = Field(default=1e-5, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="constant (the paper's), or cosine: falling to a tenth of the rate by "
        "max_steps or max_minutes, whichever ends the run first (dreamcache/training/schedule.py).")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW's default.")
    max_steps: int = Field(default=25_000, ge=1, description="Optimiser steps (the paper: 25k at batch 128).")
    max_minutes: float | None = Field(default=None, gt=0, description="Stop after this much training time even "
                                      "if max_steps is not reached (the final adapter is saved either way).")
    text_dropout: float = Field(default=0.07, ge=0, le=1)
    data_workers: int = Field(default=4, ge=0, description="Processes decoding and augmenting samples (0: in the training process).")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    channels_last: bool = Field(default=True, description="On CUDA, the UNet and VAE in channels-last memory: "
                                "their convolutions skip a layout change each (the same arithmetic).")
    fused_optimizer: bool = Field(default=True, description="On CUDA, AdamW's fused kernel: one launch for every "
                                  "adapter tensor instead of a few per tensor.")
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    validate_every: int = Field(default=1000, ge=1)
    validation_references: list[str] = Field(default_factory=list)
    validation_prompts: list[str] = Field(default_factory=list)
    validation_steps: int = 25

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        with open(path, "rb") as f:
            return _TrainConfigFile.model_validate(tomllib.load(f))


class _TrainConfigFile(TrainConfig):
    """A config read from a file must name its manifest: dataset objects are handed over in code."""

    manifest: str = Field(description="Triplet manifest (JSONL): target, reference or mask, caption.")


@runtime_checkable
class Triplets(Protocol):
    """What the trainer draws samples from: (target, reference augmented with `generator`, caption)."""

    def __len__(self) -> int: ...

    def get(self, index: int, generator: torch.Generator) -> tuple[Image.Image, Image.Image, str]: ...


@runtime_checkable
class DeviceTriplets(Protocol):
    """Triplets held on the training device and augmented there, a batch at a time.

    `draw` runs per sample (in data workers, if any) and returns only numbers: the sample's
    augmentation parameters from its generator, and its caption. `pixels` turns a batch of indices
    and parameters into targets and references in [-1, 1] on the device.
    """

    def __len__(self) -> int: ...

    def draw(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, str]: ...

    def pixels(self, indices: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def target_latents(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE posterior (mean, std) of these targets, if encoded once ahead; None: encode per batch."""
        ...


class SampleDataset(torch.utils.data.Dataset):
    """Sample seed -> (target, reference, caption, generator state), made in a data worker.

    The sample's generator draws its triplet, the reference augmentation and the caption dropout here;
    the training process continues the same generator (from the returned state) for the noise and
    the timestep. Where a sample is prepared never changes what it is. For `DeviceTriplets` the
    target and reference are the triplet's index and its augmentation parameters, turned into
    pixels on the device (`Trainer.images`).
    """

    def __init__(self, triplets: Triplets | DeviceTriplets, text_dropout: float):
        self.triplets = triplets
        self.text_dropout = text_dropout
        self.on_device = isinstance(triplets, DeviceTriplets)

    def __len__(self) -> int:  # samples are addressed by seed, not by position
        return 2**62

    def __getitem__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        index = int(torch.randint(len(self.triplets), (), generator=g))
        if self.on_device:
            params, caption = self.triplets.draw(index, g)
            target, reference = torch.tensor(index), params
        else:
            target, reference, caption = self.triplets.get(index, g)
            target, reference = _pixels(target), _pixels(reference)
        if torch.rand((), generator=g) < self.text_dropout:
            caption = ""
        # The state as numpy bytes: pickled inline, where a tensor per sample would cost a shared-memory
        # segment each between the data workers and the training process.
        return target, reference, caption, g.get_state().numpy()


def _pixels(image) -> torch.Tensor:
    """(3, H, W) uint8: a quarter of float32's bytes between processes; scaled on the device (`_to_vae`)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def _to_vae(pixels: torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 (B, 3, H, W), or floats already in [-1, 1] -> [-1, 1] in `dtype` on `device`, as the VAE expects."""
    if pixels.is_floating_point():
        return pixels.to(device, dtype)
    return pixels.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0


def _collate(samples):
    targets, references, captions, states = zip(*samples)
    return torch.stack(targets), torch.stack(references), list(captions), list(states)


class AdapterTrainingModel(nn.Module):
    """The frozen UNet with trainable adapters attached; DDP wraps this, so gradients sync."""

    def __init__(self, unet, adapters: dict[str, DreamCacheAdapter]):
        super().__init__()
        self.unet = unet.requires_grad_(False)
        # Registered here too, under module-safe names, so that DDP and the optimiser see them.
        self.adapters = nn.ModuleDict({name.replace(".", "__"): a.requires_grad_(True) for name, a in adapters.items()})
        apply_dreamcache(unet, adapters, dtype=torch.float32)  # master weights in float32

    def forward(self, noisy, timesteps, text, memory):
        # Set, not scoped: gradient checkpointing re-runs the blocks during backward, with the same memory.
        set_memory(self.unet, memory)
        return self.unet(noisy, timesteps, encoder_hidden_states=text).sample


def _seed(*parts: int) -> int:
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


class Trainer:
    """Trains adapters on `dataset` (`Triplets` or `DeviceTriplets`), or on the config's manifest."""

    def __init__(self, config: TrainConfig, accelerator=None, loader: Loader = read_bytes,
                 dataset: Triplets | DeviceTriplets | None = None):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        from dreamcache.core.pipeline import DreamCachePipeline

        self.config = config
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision,
                                                      gradient_accumulation_steps=config.gradient_accumulation)
        acc = self.accelerator
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        base = DreamCachePipeline.from_pretrained(config.base_model, dtype=self.weight_dtype,
                                                  safety_checker=None, requires_safety_checker=False)
        self.pipe = base
        self.vae, self.text_encoder, self.tokenizer = base.vae, base.text_encoder, base.tokenizer
        for module in (self.vae, self.text_encoder, base.unet):
            module.requires_grad_(False).to(acc.device)
        if config.channels_last and acc.device.type == "cuda":
            for module in (self.vae, base.unet):
                module.to(memory_format=torch.channels_last)
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        self.base_identity = _named_base(config.base_model, base, self.weight_dtype)  # before adapters are attached
        self.resolution = config.resolution or base.resolution
        self.layers = resolve_preset(base.unet, config.preset)
        if config.init_adapter:
            adapters = load_adapters(config.init_adapter, self.layers)
        else:
            torch.manual_seed(config.seed)  # PyTorch's default initialisation, as in the released code
            adapters = {layer.name: DreamCacheAdapter.for_layer(layer) for layer in self.layers}
        if config.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        self.model = AdapterTrainingModel(base.unet, adapters)
        self.adapter_modules = adapters
        self.optimizer = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters()],
                                           lr=config.learning_rate, weight_decay=config.weight_decay,
                                           fused=config.fused_optimizer and acc.device.type == "cuda")
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        if dataset is not None:
            self.dataset = dataset
            self.manifest_report = ManifestReport(rows=0, usable=len(dataset), skipped=[])
        elif config.manifest is None:
            raise ValueError("the training config names no manifest and no dataset was given: set `manifest`")
        else:
            triplets, self.manifest_report = load_manifest(config.manifest, loader=loader)
            if not triplets:
                raise ValueError(f"manifest {config.manifest} has no usable triplets "
                                 f"({len(self.manifest_report.skipped)} rows skipped)")
            self.dataset = TripletDataset(triplets, self.resolution, loader=loader)
        self.samples = SampleDataset(self.dataset, config.text_dropout)
        # Tokenising a large batch costs more CPU time per step than the GPU spends on it; captions
        # repeat (the empty one is 7% of them), so each is tokenised once (bounded: 65k x 77 ids).
        self._token_ids = functools.lru_cache(maxsize=1 << 16)(self._tokenize)
        self.step = 0
        self.output = Path(config.output_dir)
        with torch.no_grad():
            self.empty = self._encode([""])

    # --- one optimiser step ------------------------------------------------------------------

    def _encode(self, captions: list[str]) -> torch.Tensor:
        tokens = torch.stack([self._token_ids(caption) for caption in captions]).to(self.accelerator.device)
        return self.text_encoder(tokens)[0]

    def _tokenize(self, caption: str) -> torch.Tensor:
        return self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids[0]

    def micro_batch(self, step: int, micro: int) -> list[int]:
        """This process's sample seeds: a slice of the global batch, the same for any process count."""
        acc, b = self.accelerator, self.config.batch_size
        global_batch = b * acc.num_processes
        g = torch.Generator().manual_seed(_seed(self.config.seed, step, micro))
        seeds = torch.randint(0, 2**62, (global_batch,), generator=g).tolist()
        return seeds[acc.process_index * b : (acc.process_index + 1) * b]

    def batch(self, sample_seeds: list[int]):
        """A micro-batch prepared in this process (the data workers call the same function)."""
        return _collate([self.samples[seed] for seed in sample_seeds])

    def images(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's targets and references as the VAE takes them, on the device."""
        targets, references = batch[0], batch[1]
        if self.samples.on_device:  # indices and augmentation parameters: pixels made on the device
            targets, references = self.dataset.pixels(targets, references)
        device, dtype = self.accelerator.device, self.weight_dtype
        return _to_vae(targets, device, dtype), _to_vae(references, device, dtype)

    def loss(self, batch, use_cache: bool = True, model=None) -> torch.Tensor:
        """The noise-prediction MSE of a micro-batch; `use_cache=False` gives the base model's on the same draws."""
        _, _, captions, states = batch
        targets, references = self.images(batch)
        device = self.accelerator.device
        gens = []
        for state in states:
            g = torch.Generator()
            g.set_state(torch.from_numpy(state))
            gens.append(g)
        with torch.no_grad():
            mean, std = self._target_posterior(batch[0], targets)
            noise_for_vae = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
            latents = (mean + std * noise_for_vae.to(mean.dtype)) * self.vae.config.scaling_factor
            reference_latents = self.vae.encode(references).latent_dist.mode()
            reference_latents = reference_latents * self.vae.config.scaling_factor
            text = self._encode(captions)
            cache_noise = [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=g))) for g in gens]
            features = extract_features(self.model_unet, reference_latents, self.empty, self.layers,
                                        self.noise_scheduler, timestep=1, generators=cache_noise)
            memory = {name: LayerMemory(tokens=f.detach(), rows=None, mask=None) for name, f in features.items()}
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device, latents.dtype)
        timesteps = torch.tensor([int(torch.randint(self.noise_scheduler.config.num_train_timesteps, (), generator=g))
                                  for g in gens], device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = (model or self.model)(noisy, timesteps, text, memory if use_cache else None)
        return F.mse_loss(prediction.float(), target.float())

    def _target_posterior(self, indices: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of a micro-batch's targets: encoded once ahead where the dataset
        holds them (targets are not augmented, so each one's posterior never changes), else now."""
        ahead = self.dataset.target_latents(indices) if self.samples.on_device else None
        if ahead is not None:
            mean, std = ahead
            return mean.to(self.weight_dtype), std.to(self.weight_dtype)
        posterior = self.vae.encode(targets).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def cache_effect(self) -> float:
        """How much the cache lowers the loss on a fixed batch (same samples, noise, timesteps), relative.

        Zero means the adapters ignore the memory (they can learn to reproduce the base block
        first), whatever the loss curve says; trained adapters should keep it clearly positive.
        """
        batch = self.batch(self.micro_batch(-1, 0))  # step -1: a batch the loop never draws
        model = self.accelerator.unwrap_model(self.model)  # one process only: no DDP collectives
        with self.accelerator.autocast():
            with_cache = self.loss(batch, model=model).item()
            without = self.loss(batch, use_cache=False, model=model).item()
        set_memory(self.model_unet, None)
        return (without - with_cache) / without

    def batches(self):
        """Every micro-batch from the current step on, prepared ahead by the data workers."""
        seeds = (self.micro_batch(step, micro) for step in range(self.step, self.config.max_steps)
                 for micro in range(self.config.gradient_accumulation))
        workers = self.config.data_workers
        return iter(torch.utils.data.DataLoader(self.samples, batch_sampler=seeds, num_workers=workers,
                                                collate_fn=_collate, prefetch_factor=4 if workers else None,
                                                pin_memory=torch.cuda.is_available()))

    @property
    def model_unet(self):
        return self.accelerator.unwrap_model(self.model).unet

    def train_step(self, batches=None) -> float:
        """One optimiser step (with its accumulation micro-steps); returns the mean loss over all processes.

        `batches` yields prepared micro-batches (see `batches()`); without it they are made here.
        """
        losses = []
        for micro in range(self.config.gradient_accumulation):
            batch = next(batches) if batches is not None else self.batch(self.micro_batch(self.step, micro))
            with self.accelerator.accumulate(self.model):
                loss = self.loss(batch)
                self.accelerator.backward(loss)
                set_memory(self.model_unet, None)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        self.step += 1
        mean = torch.stack(losses).mean()
        return self.accelerator.reduce(mean, reduction="mean").item()

    # --- checkpoints -------------------------------------------------------------------------

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig.for_layers(self.config.preset, self.layers, base_model=self.base_identity)

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        folder = self.output / CHECKPOINTS / f"step-{self.step:07d}"
        save_adapters(folder, self.adapter_modules, self.adapter_config())
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps({"step": self.step, "config": self.config.model_dump()}, indent=2))
        for old in sorted((self.output / CHECKPOINTS).glob("step-*"))[: -self.config.keep_checkpoints]:
            for file in old.iterdir():
                file.unlink()
            old.rmdir()
        return folder

    def resume(self, checkpoint: str | Path = "latest") -> int:
        folder = Path(checkpoint)
        if str(checkpoint) == "latest":
            found = sorted((self.output / CHECKPOINTS).glob("step-*"))
            if not found:
                return 0
            folder = found[-1]
        read_adapter_config(folder)  # a clear error if this is not an adapter directory
        state = load_adapters(folder, self.layers)
        for name, adapter in self.adapter_modules.items():
            adapter.load_state_dict(state[name].state_dict())
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        self.step = json.loads((folder / STATE_FILE).read_text())["step"]
        logger.info("resumed from %s at step %d", folder, self.step)
        return self.step

    # --- validation ----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> Path | None:
        config = self.config
        if not (config.validation_references and config.validation_prompts) or not self.accelerator.is_main_process:
            return None
        from dreamcache.perception.contact_sheet import contact_sheet
        from dreamcache.core.images import open_image

        pipe = self.pipe
        pipe.load_dreamcache(self.adapter_modules, config.preset, dtype=torch.float32)
        shots = []
        autocast = torch.autocast(self.accelerator.device.type, dtype=self.weight_dtype,
                                  enabled=self.weight_dtype != torch.float32)
        with autocast:
            for reference in config.validation_references:
                subject = pipe.cache_subject(open_image(reference), resolution=self.resolution)
                images = pipe(config.validation_prompts, subject=subject, seed=0, resolution=self.resolution,
                              num_inference_steps=config.validation_steps, progress=False).images
                shots += [(image, f"{Path(reference).stem}: {prompt}") for image, prompt in zip(images, config.validation_prompts)]
        path = self.output / "validation" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(open_image(config.validation_references[0]), shots, title=f"validation at step {self.step}",
                      columns=len(config.validation_prompts) + 1).save(path)
        return path

    # --- the loop ----------------------------------------------------------------------------

    def train(self, resume: str | None = None) -> Path:
        config, acc = self.config, self.accelerator
        if resume:
            self.resume(resume)
        log_path = self.output / "log.jsonl"
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            report = self.manifest_report
            logger.info("manifest: %d rows, %d usable, %d skipped", report.rows, report.usable, len(report.skipped))
        started, samples = time.perf_counter(), 0
        per_step = config.batch_size * config.gradient_accumulation * acc.num_processes
        batches = self.batches()
        last = False
        while not last:
            lr = self._schedule_lr(started)
            loss = self.train_step(batches)
            samples += per_step
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}: lower the learning rate or use bf16")
            last = self.step >= config.max_steps or self._out_of_time(started)
            validating = self.step % config.validate_every == 0
            if acc.is_main_process and (self.step % config.log_every == 0 or last or validating):
                elapsed = time.perf_counter() - started
                record = dict(step=self.step, loss=loss, lr=lr, samples_per_s=samples / elapsed,
                              elapsed_s=elapsed, processes=acc.num_processes)
                if torch.cuda.is_available():
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                if validating:
                    record["cache_effect"] = self.cache_effect()
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
            if validating:
                self.validate()
        acc.wait_for_everyone()
        final = self.output / "adapter"
        if acc.is_main_process:
            save_adapters(final, self.adapter_modules, self.adapter_config())
        return final

    def _schedule_lr(self, started: float) -> float:
        """Sets the learning rate of the coming step from the run's progress and returns it. Time
        differs a little between processes, so they share the mean progress: the same rate everywhere."""
        config = self.config
        if config.lr_schedule == "constant":
            return config.learning_rate
        progress = stage_progress(self.step, config.max_steps, time.perf_counter() - started, config.max_minutes)
        if self.accelerator.num_processes > 1:
            shared = torch.tensor(progress, device=self.accelerator.device)
            progress = self.accelerator.reduce(shared, reduction="mean").item()
        lr = config.learning_rate * lr_factor(config.lr_schedule, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _out_of_time(self, started: float) -> bool:
        """Whether `max_minutes` of training have passed; every process gets the main process's answer."""
        if self.config.max_minutes is None:
            return False
        late = torch.tensor(float(time.perf_counter() - started > 60 * self.config.max_minutes),
                            device=self.accelerator.device)
        return bool(self.accelerator.reduce(late, reduction="sum").item() > 0)


def main(argv: list[str] | None = None, loader: Loader = read_bytes,
         trainer_for: Callable[[TrainConfig, Loader], Trainer] = lambda config, loader: Trainer(config, loader=loader),
         ) -> None:
    """The command line over a TOML config; `trainer_for` builds the trainer (callers above this package
    hand in their datasets this way)."""
    import argparse

    parser = argparse.ArgumentParser(description="Train DreamCache adapters (see docs/training.md).")
    parser.add_argument("config", help="TOML training config")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    final = trainer_for(TrainConfig.from_file(args.config), loader).train(resume=args.resume)
    print(f"adapters written to {final}")


def _named_base(name: str, base, dtype: torch.dtype) -> str:
    """How the adapters' config names their base (`weights.base_identity`): its hub id, or for a folder (the
    training machine's path, which means nothing elsewhere) the base weights' fingerprint. A bfloat16 copy
    does not keep the weights' float16 rounding, so under bf16 the fingerprint is read from a float16 copy."""
    identity = base_identity(name, base.unet, base.vae)
    if identity.startswith(FINGERPRINT_PREFIX) and dtype == torch.bfloat16:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        identity = base_identity(name, UNet2DConditionModel.from_pretrained(name, subfolder="unet",
                                                                            torch_dtype=torch.float16),
                                 AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=torch.float16))
    return identity


if __name__ == "__main__":
    main(sys.argv[1:])
