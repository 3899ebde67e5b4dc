"""What adapter weights are for, read without torch: the layers they fit, the settings they are meant to be
sampled with, and `adapter_config.json` (the settings and the Prefect form read it before any model loads).
The weights themselves are `weights`."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dreamcache import __version__
from dreamcache.core.errors import AdapterWeightsError
from dreamcache.core.guidance import DEFAULT_IMAGE_SCALE, DEFAULT_TEXT_SCALE
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
    """The settings a model is meant to be sampled with, which a caller takes wherever it sets none.

    The one home of these defaults: the pipeline (`DreamCachePipeline.dreamcache_defaults`, from the loaded
    adapter's config) and the catalogue run (`CatalogueRunParams.with_recommended`) both fill what their
    caller left unset with `resolve`.

    The defaults are the method's (empty text for the unconditional passes and the cache, the reference
    letterboxed on white, the latent's mode) with the authors' steps and scales for Stable Diffusion (50
    steps, text scale 7.5, image scale 0.3 to 0.4), on the base model's own scheduler. A model of one's
    own records its working point here (the bundled product-world model: docs/toy-world.md);
    `AUTHORS_INFERENCE` is the authors' released inference, which a converted checkpoint records.
    """

    steps: int = 50
    images_per_prompt: int = 2
    image_scale: float = DEFAULT_IMAGE_SCALE
    text_scale: float = DEFAULT_TEXT_SCALE
    sampler: str = "model"
    eta: float = 0.0
    negative_prompt: str = ""
    reference_mode: str = "letterbox"
    latent: str = "mode"
    # The UNet's deep features reused across steps (`denoiser.DeepReuse`); None: not reused. It changes the
    # images: a model recommends it only where its fidelity held (BENCHMARKS.md, "Feature reuse across steps").
    deep_reuse_interval: int | None = None

    def __post_init__(self):
        for name in ("steps", "images_per_prompt"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive integer")
        for name in ("image_scale", "text_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} {value!r} must be a number, 0 or more")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"unknown reference_mode {self.reference_mode!r}; choose one of "
                             f"{', '.join(REFERENCE_MODES)}")
        if self.latent not in ("mode", "sample"):
            raise ValueError(f"latent {self.latent!r}: choose 'mode' or 'sample'")
        check_eta(self.sampler, self.eta)
        check_reuse_interval(self.deep_reuse_interval)

    def resolve(self, *, steps: int | None = None, images_per_prompt: int | None = None,
                image_scale: float | None = None, text_scale: float | None = None, sampler: str | None = None,
                eta: float | None = None, negative_prompt: str | None = None, reference_mode: str | None = None,
                latent: str | None = None, deep_reuse_interval: int | None = None) -> "Recommended":
        """The settings in force: the caller's value wherever it gives one (not None), these elsewhere.

        A recommended eta belongs to the recommended sampler: a caller who names another sampler and no eta
        gets 0 (deterministic), not the eta of a sampler it does not use. A caller's eta that its sampler
        (given or recommended) does not take is refused (`check_eta`).
        """
        if eta is None:
            eta = self.eta if sampler is None else 0.0
        given = dict(steps=steps, images_per_prompt=images_per_prompt, image_scale=image_scale,
                     text_scale=text_scale, sampler=sampler, negative_prompt=negative_prompt,
                     reference_mode=reference_mode, latent=latent, deep_reuse_interval=deep_reuse_interval)
        return replace(self, eta=eta, **{k: v for k, v in given.items() if v is not None})

    def sampling(self) -> dict:
        """Keyword arguments of `DreamCachePipeline.__call__` for these settings."""
        return dict(num_inference_steps=self.steps, guidance_scale=self.text_scale,
                    image_guidance_scale=self.image_scale, sampler=self.sampler, eta=self.eta,
                    negative_prompt=self.negative_prompt, deep_reuse_interval=self.deep_reuse_interval)

    def caching(self) -> dict:
        """Keyword arguments of `DreamCachePipeline.cache_subjects` for these settings."""
        return dict(text=self.negative_prompt, reference_mode=self.reference_mode, latent=self.latent)


def check_reuse_interval(interval: int | None) -> None:
    if interval is not None and (not isinstance(interval, int) or isinstance(interval, bool) or interval < 1):
        raise ValueError(f"deep_reuse_interval {interval!r} must be a whole number of steps, 1 or more (1: the deep "
                         "path at every step), or None for no reuse")


# The authors' released inference (their sampling scripts; docs/models.md lists where the default differs):
# DDIM, 50 steps, eta 0, text scale 7.5, image scale 0.35 (their scripts use 0.3 to 0.4), four shots per
# prompt as in their evaluation, their negative prompt for both unconditional passes and for the cache,
# the reference stretched to the square (bilinear) and the VAE posterior sampled.
AUTHORS_INFERENCE = Recommended(steps=50, images_per_prompt=4, image_scale=0.35, text_scale=7.5, sampler="ddim",
                                eta=0.0, negative_prompt=AUTHORS_NEGATIVE_PROMPT, reference_mode="stretch",
                                latent="sample")


@dataclass(frozen=True)
class AdapterConfig:
    """What the weights are for: the preset and the exact layers (name, widths, heads), the base they were
    trained on (`base_identity`: a hub id or the base weights' fingerprint, never a machine's path), and the
    settings they are meant to be sampled with."""

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
