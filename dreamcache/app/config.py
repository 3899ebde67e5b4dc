"""Settings, in one typed object, read from `DREAMCACHE_*` environment variables and a TOML file.

Precedence: explicit arguments, then environment variables, then the file named by
`DREAMCACHE_CONFIG` (TOML, same field names without the prefix), then the defaults below.
The CLI, the flows and the tests all build their settings here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from dreamcache.core.errors import DreamCacheError

BUNDLED_MODEL = "bundled:product-world"
# The project's own model of the procedural product world (docs/toy-world.md), shipped in the package
# and read in place: a Stable Diffusion directory, its DreamCache adapters and the world's CLIP scorer.
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "assets" / "product-world"
# The bundled adapters' working point (docs/toy-world.md): the toy adapters need a far larger image
# scale than the authors' 0.35 on Stable Diffusion before the product shows.
BUNDLED_IMAGE_SCALE = 5.0
# Each part of the bundled model and the file that shows it is there.
BUNDLED_PARTS = {"base": "model_index.json", "adapter": "adapter_config.json", "clip": "config.json"}


class BundledModelMissing(DreamCacheError, FileNotFoundError):
    """A part of the bundled model is not in the installed package."""


def bundled_part(name: str) -> Path:
    """The folder of one part of the bundled model (base, adapter, clip), or an error naming what is missing."""
    folder = BUNDLED_DIR / name
    marker = folder / BUNDLED_PARTS[name]
    if not marker.is_file():
        raise BundledModelMissing(
            f"the bundled model's {name}/ is incomplete: {marker} is missing. Reinstall the package "
            "(a checkout needs the committed dreamcache/assets/product-world/), or set DREAMCACHE_BASE_MODEL "
            "(and DREAMCACHE_ADAPTER, DREAMCACHE_CLIP_MODEL) to a model of your own")
    return folder


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DREAMCACHE_", extra="forbid", validate_default=True)

    home: Path = Field(
        default=Path("~/.dreamcache"),
        description="Data directory of the embedded default: the database, objects (caches, shots) and outputs.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the platform database; default: a SQLite file in `home`. "
        "Production: postgresql+psycopg://user@host/db (password from the URL or PGPASSWORD).",
    )
    objects_url: str | None = Field(
        default=None,
        description="Object storage root: s3://bucket/prefix, or a local directory; default: `home`/objects. "
        "S3 endpoint and credentials come from the standard AWS environment and config.",
    )
    lease_seconds: int = Field(
        default=60, ge=5, description="How long a claimed item and a run stay a worker's without a heartbeat (renewed "
        "every quarter of it while the worker lives); then others may take the items, and the run counts as crashed.",
    )
    base_model: str = Field(
        default=BUNDLED_MODEL,
        description="Base Stable Diffusion pipeline: a local diffusers directory, a hub id, or the bundled model "
        f"({BUNDLED_MODEL!r}, the product-world model).",
    )
    adapter: str | None = Field(
        default=None,
        description="DreamCache adapter directory (adapter_config.json + adapter_model.safetensors); "
        "None uses the bundled model's adapters.",
    )
    preset: str = Field(default="default", description="Layer preset for freshly initialised adapters.")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="'auto' is float16 on CUDA and float32 on CPU."
    )
    fast_paths: Literal["auto", "off"] = Field(
        default="auto",
        description="'auto': on CUDA, compiled UNet halves, CUDA graphs and padded static batches (the first "
        "batch of a shape compiles, about a minute); everywhere, combined guidance shares its encoder half. "
        "'off': eager passes, as plain diffusers runs them.",
    )
    sam_checkpoint: Path | None = Field(
        default=None, description="Segment Anything checkpoint (.pth or .safetensors); unset: the border-colour segmenter."
    )
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] | None = Field(
        default=None, description="SAM size; unset: read from the checkpoint's file name."
    )
    detector_model: str | None = Field(
        default=None, description="Text-grounded detector for SAM's box (OWL-ViT, OWLv2, Grounding DINO): directory or hub id."
    )
    clip_model: str | None = Field(
        default=None, description="CLIP ViT-B/32 scorer: local directory or hub id; unset with the bundled model: "
        "the product world's CLIP.")
    dino_model: str | None = Field(default=None, description="DINO ViT-S/16 scorer: local directory or hub id.")

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get("DREAMCACHE_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"DREAMCACHE_CONFIG names {config_file}, which is not a file")
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
        return sources

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'dreamcache.db'}"

    @property
    def resolved_objects_url(self) -> str:
        return self.objects_url or str(self.home / "objects")

    # The bundled model's parts stand in wherever a setting is unset and the base is the bundled model.
    @property
    def resolved_base_model(self) -> str:
        return str(bundled_part("base")) if self.base_model == BUNDLED_MODEL else self.base_model

    @property
    def resolved_adapter(self) -> str | None:
        if self.adapter or self.base_model != BUNDLED_MODEL:
            return self.adapter
        return str(bundled_part("adapter"))

    @property
    def resolved_clip_model(self) -> str | None:
        if self.clip_model or self.base_model != BUNDLED_MODEL:
            return self.clip_model
        return str(bundled_part("clip"))

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"
