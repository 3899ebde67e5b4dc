"""What adapter weights are for, read without torch: the layers they fit, the settings they are meant to be
sampled with, and `adapter_config.json` (the settings and the Prefect form read it before any model loads).
The weights themselves are `weights`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dreamcache import __version__
from dreamcache.core.errors import AdapterWeightsError
from dreamcache.core.images import REFERENCE_MODES
from dreamcache.core.layers import PRESETS
from dreamcache.core.schedulers import SAMPLERS, check_eta

if TYPE_CHECKING:
    from dreamcache.core.layers import Layer

CONFIG_NAME = "adapter_config.json"
FORMAT = "dreamcache.adapter/1"


@dataclass(frozen=True)
class LayerSpec:
    """One adapted layer as the weights were made for it: its name and widths (see `layers.Layer`)."""

    name: str
    channels: int
    inner_dim: int
    heads: int

    def __post_init__(self):
        if not self.name or any(not isinstance(v, int) or isinstance(v, bool) or v < 1
                                for v in (self.channels, self.inner_dim, self.heads)):
            raise ValueError(f"layer {self.name!r}: channels, inner_dim and heads must be positive integers")


# The text of the unconditional passes and of the cache pass in the authors' released sampling scripts.
AUTHORS_NEGATIVE_PROMPT = "Open mouth, tongue out, teeth visible, bad photo, low quality, blurred, deformed"


@dataclass(frozen=True)
class Recommended:
    """The settings a model is meant to be sampled with, which a run takes when it does not set them.

    The defaults are the method's (empty text for the unconditional passes and the cache, the reference
    letterboxed on white, the latent's mode) with the authors' steps and scales for Stable Diffusion (50
    steps, text scale 7.5, image scale 0.3 to 0.4), on the base model's own scheduler. A model of one's
    own records its working point here (the bundled product-world model: docs/toy-world.md);
    `AUTHORS_INFERENCE` is the authors' released inference, which a converted checkpoint records.
    """

    steps: int = 50
    images_per_prompt: int = 2
    image_scale: float = 0.35
    text_scale: float = 7.5
    sampler: str = "model"
    eta: float = 0.0
    negative_prompt: str = ""
    reference_mode: str = "letterbox"
    latent: str = "mode"

    def __post_init__(self):
        if not (isinstance(self.steps, int) and self.steps >= 1 and isinstance(self.images_per_prompt, int)
                and self.images_per_prompt >= 1 and isinstance(self.image_scale, (int, float)) and self.image_scale > 0
                and isinstance(self.text_scale, (int, float)) and self.text_scale >= 0):
            raise ValueError(f"recommended settings {self} must be positive (steps and images_per_prompt integers)")
        if self.sampler not in SAMPLERS or self.reference_mode not in REFERENCE_MODES or self.latent not in ("mode",
                                                                                                           "sample"):
            raise ValueError(f"recommended settings {self}: sampler one of {SAMPLERS}, reference_mode one of "
                             f"{REFERENCE_MODES}, latent 'mode' or 'sample'")
        check_eta(self.sampler, self.eta)

    def sampling(self) -> dict:
        """Keyword arguments of `DreamCachePipeline.__call__` for these settings."""
        return dict(num_inference_steps=self.steps, guidance_scale=self.text_scale,
                    image_guidance_scale=self.image_scale, sampler=self.sampler, eta=self.eta,
                    negative_prompt=self.negative_prompt)

    def caching(self) -> dict:
        """Keyword arguments of `DreamCachePipeline.cache_subjects` for these settings."""
        return dict(text=self.negative_prompt, reference_mode=self.reference_mode, latent=self.latent)


# The authors' released inference (their sampling scripts; docs/models.md lists where the default differs):
# DDIM, 50 steps, eta 0, text scale 7.5, image scale 0.35 (their scripts use 0.3 to 0.4), four shots per
# prompt as in their evaluation, their negative prompt for both unconditional passes and for the cache,
# the reference stretched to the square (bilinear) and the VAE posterior sampled.
AUTHORS_INFERENCE = Recommended(steps=50, images_per_prompt=4, image_scale=0.35, text_scale=7.5, sampler="ddim",
                                eta=0.0, negative_prompt=AUTHORS_NEGATIVE_PROMPT, reference_mode="stretch",
                                latent="sample")


@dataclass(frozen=True)
class AdapterConfig:
    """What the weights are for: the preset and the exact layers (name, widths, heads), and the settings
    they are meant to be sampled with."""

    preset: str
    layers: tuple[LayerSpec, ...]
    base_model: str | None = None
    library_version: str = __version__
    format: str = FORMAT
    recommended: Recommended = Recommended()

    def __post_init__(self):
        if self.format != FORMAT:
            raise ValueError(f"format {self.format!r} is not one this version ({__version__}) reads ({FORMAT!r})")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if not self.layers:
            raise ValueError("no layers")
        # Read from JSON the layers are dicts: made LayerSpecs here, so every config holds the same types.
        object.__setattr__(self, "layers", tuple(
            layer if isinstance(layer, LayerSpec) else LayerSpec(**layer) for layer in self.layers))
        if isinstance(self.recommended, dict):
            object.__setattr__(self, "recommended", Recommended(**self.recommended))

    @classmethod
    def for_layers(cls, preset: str, layers: Sequence[Layer], base_model: str | None = None,
                   recommended: Recommended = Recommended()) -> "AdapterConfig":
        return cls(preset, tuple(LayerSpec(layer.name, layer.channels, layer.inner_dim, layer.heads)
                                 for layer in layers), base_model, recommended=recommended)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    path = Path(directory) / CONFIG_NAME
    try:
        return AdapterConfig(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise AdapterWeightsError(f"{path} not found: is {directory} a DreamCache adapter directory?") from None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise AdapterWeightsError(f"{path} is not a valid adapter config ({exc})") from exc
