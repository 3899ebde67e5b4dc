"""The parameters of a catalogue run: one pydantic model, rendered by the Prefect UI as a validated form."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from dreamcache.core.schedulers import SAMPLERS
from dreamcache.core.weights import AUTHORS_INFERENCE, Recommended
from dreamcache.core.guidance import (
    COMBINED, DEFAULT_GUIDANCE, DEFAULT_TEXT_SCALE, JOINT, MAX_IMAGE_SCALE, MAX_TEXT_SCALE, Guidance,
)

MAX_PROMPT_CHARS = 1000


class CatalogueRunParams(BaseModel):
    """A catalogue run: which products, which prompts, how many shots, with which sampler settings.

    The fields are in the order a person fills the Prefect form: what, how many, how, where. A 0 in
    steps, images per prompt, image scale or resolution means "the model's": the model records what it
    is meant to be sampled with (its adapter config's `recommended`; docs/models.md), and the run takes it.
    """

    # What
    source: str = Field(
        description="Products: an S3 prefix (s3://bucket/catalogue/), a local folder (category sub-folders "
        "optional; the file name is the SKU), or a manifest (.csv or .jsonl with sku, category, image_uri). "
        "It must lie in a place the operator allows (DREAMCACHE_ALLOWED_SOURCES).",
        min_length=1,
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompt templates; {category}, {sku} and manifest fields are filled in per product.",
    )
    prompt_file: str = Field(
        default="", description="A text file or URI with one prompt template per line, used after `prompts` "
        "(in an allowed place, at most 1 MB)."
    )
    # How many
    images_per_prompt: int = Field(default=0, ge=0, le=64, description="Shots per product and prompt; 0: the model's.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="First seed.")
    seed_policy: Literal["fixed", "per-product"] = Field(
        default="fixed",
        description="fixed: every product uses seeds seed, seed+1, ...; per-product: offset by a hash of the SKU.",
    )
    # How
    preset: Literal["model", "authors"] = Field(
        default="model",
        description="Where the settings left at 0 or 'preset' come from: the model's recommended ones, or the authors' "
        "released inference (DDIM 50 steps, eta 0, image scale 0.35, their negative prompt for the unconditional "
        "passes and the cache, the reference photo stretched to the square, the VAE posterior sampled; docs/models.md).",
    )
    sampler: Literal["preset", *SAMPLERS] = Field(
        default="preset", description="The scheduler: " + ", ".join(SAMPLERS) + " (model: the base model's own); "
        "preset: the preset's (for the bundled model UniPC, 10 steps).")
    eta: float = Field(default=0.0, ge=0.0, le=1.0, description="DDIM's noise: 0 deterministic (DDIM only).")
    negative_prompt: str = Field(
        default="", max_length=MAX_PROMPT_CHARS,
        description="Text of the unconditional passes and of the cache; empty: the preset's (none for the model "
        "preset unless the model recommends one). Caches are made once per text.")
    guidance: Guidance = Field(
        default=DEFAULT_GUIDANCE,
        description=f"{COMBINED}: 3 UNet passes a step, separate image and text scales; {JOINT}: 2, one scale.",
    )
    text_scale: float = Field(default=DEFAULT_TEXT_SCALE, ge=0.0, le=MAX_TEXT_SCALE, description="Text guidance scale.")
    image_scale: float = Field(
        default=0.0, ge=0.0, le=MAX_IMAGE_SCALE,
        description=f"Image guidance scale ({COMBINED} only): higher keeps more of the product; 0: the model's "
        "working point (the authors' 0.35 on Stable Diffusion, 5 for the bundled model).")
    steps: int = Field(default=0, ge=0, le=500, description="Denoising steps per image; 0: the model's.")
    resolution: int = Field(
        default=0, ge=0, le=2048, multiple_of=8, description="Image side in pixels (at least 64); 0: the model's native."
    )
    # Where
    output_prefix: str = Field(
        default="shots", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,200}$",
        description="Key prefix of the images, sidecars and contact sheets in the object store.",
    )
    execution: Literal["in-process", "task-workers"] = Field(
        default="in-process",
        description="in-process: this flow run generates; task-workers: batches go to long-lived GPU workers "
        "(`dreamcache worker`), one per GPU, each loading the model once.",
    )
    batch_size: int = Field(default=16, ge=1, le=64, description="Images per generation task.")
    shard_size: int = Field(
        default=2048, ge=1, le=100_000, description="Images per child run; larger catalogues are sharded."
    )
    compare_text_only: bool = Field(
        default=False,
        description="Also generate, beside each shot, the text-only shot of its prompt and seed (no cache), and "
        "show the pairs on the contact sheets. Not part of a shot's identity: turning it on regenerates nothing, "
        "and shots made without it stay without.",
    )
    dry_run: bool = Field(default=False, description="List and validate inputs and plan the work; write nothing.")

    def with_recommended(self, recommended: Recommended) -> "CatalogueRunParams":
        """These parameters with every 0 that means "the model's" replaced by the model's value (resolution
        stays 0 until the model is loaded: its native size is the pipeline's)."""
        return self.model_copy(update=dict(
            steps=self.steps or recommended.steps,
            images_per_prompt=self.images_per_prompt or recommended.images_per_prompt,
            image_scale=self.image_scale or recommended.image_scale,
            sampler=recommended.sampler if self.sampler == "preset" else self.sampler,
            negative_prompt=self.negative_prompt or recommended.negative_prompt))

    def recommended(self, model: Recommended) -> Recommended:
        """The settings this run's preset stands for: the model's, or the authors' released inference."""
        return AUTHORS_INFERENCE if self.preset == "authors" else model

    @field_validator("prompt_file", mode="before")
    @classmethod
    def _no_prompt_file(cls, value):
        return "" if value is None else value  # runs recorded before 0.2 wrote None

    @field_validator("negative_prompt")
    @classmethod
    def _clean_negative(cls, text: str) -> str:
        return check_prompt(text, "negative_prompt") if text.strip() else ""

    @field_validator("prompts")
    @classmethod
    def _clean_prompts(cls, prompts: list[str]) -> list[str]:
        return [check_prompt(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]

    @field_validator("output_prefix")
    @classmethod
    def _plain_prefix(cls, prefix: str) -> str:
        if any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ValueError(f"output_prefix {prefix!r} must not have empty, '.' or '..' parts")
        return prefix

    @field_validator("resolution")
    @classmethod
    def _usable_resolution(cls, resolution: int) -> int:
        if 0 < resolution < 64:
            raise ValueError(f"resolution {resolution} is below 64 pixels; give 64 or more, or 0 for the model's")
        return resolution

    @model_validator(mode="after")
    def _some_prompts(self) -> "CatalogueRunParams":
        if not self.prompts and not self.prompt_file:
            raise ValueError("give prompts, a prompt_file, or both")
        if self.eta and self.sampler not in ("ddim", "preset"):
            raise ValueError(f"eta {self.eta} applies to the ddim sampler only, not {self.sampler!r}: set eta to 0")
        return self


def check_prompt(prompt: str, name: str) -> str:
    """A prompt without control characters, not empty, not enormous; or an error naming it."""
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in prompt).split())
    if not cleaned:
        raise ValueError(f"{name} is empty")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} has {len(cleaned)} characters, more than {MAX_PROMPT_CHARS}")
    return cleaned
