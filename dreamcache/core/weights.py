"""Adapter weights on disk: `adapter_config.json` + `adapter_model.safetensors`, adapters only.

Also the converter for the authors' released checkpoint (a pickled state dict with
latent-diffusion key names), which is the only place a `.pt` file is ever opened, and then
with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dreamcache import __version__
from dreamcache.core.adapter import DreamCacheAdapter
from dreamcache.core.architectures import build_unet, unet_config
from dreamcache.core.denoiser import check_reuse_interval
from dreamcache.core.errors import AdapterWeightsError
from dreamcache.core.images import REFERENCE_MODES
from dreamcache.core.schedulers import SAMPLERS, check_eta
from dreamcache.core.layers import PRESETS, Layer, resolve_preset

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
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
    # The UNet's deep features reused across steps (`denoiser.DeepReuse`); None: not reused. It changes the
    # images: a model recommends it only where its fidelity held (BENCHMARKS.md, "Feature reuse across steps").
    deep_reuse_interval: int | None = None

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
        check_reuse_interval(self.deep_reuse_interval)

    def sampling(self) -> dict:
        """Keyword arguments of `DreamCachePipeline.__call__` for these settings."""
        return dict(num_inference_steps=self.steps, guidance_scale=self.text_scale,
                    image_guidance_scale=self.image_scale, sampler=self.sampler, eta=self.eta,
                    negative_prompt=self.negative_prompt, deep_reuse_interval=self.deep_reuse_interval)

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


def adapter_state_dict(adapters: Mapping[str, DreamCacheAdapter]) -> dict[str, torch.Tensor]:
    """Flat state dict keyed `<layer>.<tensor>`, e.g. `mid_block.attentions.0.attn_mem.to_q.weight`."""
    return {f"{name}.{key}": t for name, adapter in adapters.items() for key, t in adapter.state_dict().items()}


def expected_shapes(layers: Sequence[Layer]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        adapters = {layer.name: DreamCacheAdapter.for_layer(layer) for layer in layers}
    return {key: tuple(t.shape) for key, t in adapter_state_dict(adapters).items()}


def check_state_dict(state: Mapping[str, torch.Tensor], layers: Sequence[Layer], source: str) -> None:
    """Report unknown, missing and misshapen tensors by name; never drop any silently."""
    expected = expected_shapes(layers)
    problems = [f"unknown tensor {key} {tuple(state[key].shape)}" for key in sorted(set(state) - set(expected))]
    problems += [f"missing tensor {key} {expected[key]}" for key in sorted(set(expected) - set(state))]
    problems += [
        f"misshapen tensor {key}: {tuple(state[key].shape)}, expected {expected[key]}"
        for key in sorted(set(state) & set(expected))
        if tuple(state[key].shape) != expected[key]
    ]
    if problems:
        listed = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise AdapterWeightsError(f"adapter weights {source} do not fit the model's layers:\n  {listed}")


def save_adapters(directory: str | Path, adapters: Mapping[str, DreamCacheAdapter], config: AdapterConfig) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: t.detach().contiguous().cpu() for k, t in adapter_state_dict(adapters).items()}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": FORMAT})
    (directory / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    path = Path(directory) / CONFIG_NAME
    try:
        return AdapterConfig(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise AdapterWeightsError(f"{path} not found: is {directory} a DreamCache adapter directory?") from None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise AdapterWeightsError(f"{path} is not a valid adapter config ({exc})") from exc


def load_adapters(directory: str | Path, layers: Sequence[Layer]) -> dict[str, DreamCacheAdapter]:
    """Adapters for `layers`, with their weights read (safetensors only) and checked by name and shape."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(path, framework="pt") as f:
            file_format = (f.metadata() or {}).get("format")
        state = load_file(path)
    except FileNotFoundError:
        raise AdapterWeightsError(f"{path} not found") from None
    except (SafetensorError, OSError) as exc:
        raise AdapterWeightsError(f"{path} is not a readable safetensors file ({exc})") from exc
    if file_format != FORMAT:
        raise AdapterWeightsError(f"{path} is in format {file_format!r}, not {FORMAT!r}: an authors' checkpoint "
                                  "converts with `dreamcache convert-checkpoint`; other weights are not adapters")
    check_state_dict(state, layers, str(path))
    return _adapters_from_state(state, layers)


def _adapters_from_state(state: Mapping[str, torch.Tensor], layers: Sequence[Layer]) -> dict[str, DreamCacheAdapter]:
    adapters = {layer.name: DreamCacheAdapter.for_layer(layer) for layer in layers}
    for name, adapter in adapters.items():
        prefix = name + "."
        adapter.load_state_dict({k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)})
    return adapters


# --- the authors' checkpoint --------------------------------------------------------------

# `...transformer_blocks.0.<tensor>` under one of latent-diffusion's block names.
_ORIGINAL_KEY = re.compile(
    r"^(?P<block>input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
    r"\.transformer_blocks\.0\.(?P<tensor>attn_mem\.to_[qkv]\.weight|attn_mem\.to_out\.0\.(weight|bias)"
    r"|norm2_mem\.(weight|bias)|linear_cat\.(weight|bias))$"
)


_LAYER_PREFIX = re.compile(r"^((?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+)\.")


def _diffusers_block(ldm_block: str, layers_per_block: int) -> str:
    """latent-diffusion's `input_blocks.k.1` / `middle_block.1` / `output_blocks.k.1` in diffusers' names."""
    kind, _, rest = ldm_block.partition(".")
    if kind == "middle_block":
        return "mid_block.attentions.0"
    k = int(rest.split(".")[0])
    per_level = layers_per_block + 1  # a level's transformers, then its down/upsampler or extra layer
    if kind == "input_blocks":  # input_blocks.0 is the stem convolution
        return f"down_blocks.{(k - 1) // per_level}.attentions.{(k - 1) % per_level}"
    return f"up_blocks.{k // per_level}.attentions.{k % per_level}"


def convert_original_checkpoint(src: str | Path, dst: str | Path, architecture: str = "sd21",
                                unet: UNet2DConditionModel | None = None) -> AdapterConfig:
    """Convert the authors' `cross_attention-<step>.pt` into this project's adapter directory.

    The adapters are for `architecture` (sd15, sd21, ...), or for `unet` when one is given (a model of
    the same layout at another size). The converted config recommends the authors' released inference
    (`AUTHORS_INFERENCE`), so a run with it samples as their scripts do unless told otherwise.
    """
    src = Path(src)
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterWeightsError(f"checkpoint {src} not found") from None
    except Exception as exc:  # the unpickler raises many types; all mean "not a plain state dict"
        raise AdapterWeightsError(
            f"checkpoint {src} cannot be loaded as a plain state dict with weights_only=True ({exc})"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterWeightsError(f"checkpoint {src} is not a state dict of tensors")

    layers_per_block = unet.config.layers_per_block if unet is not None else unet_config(architecture)["layers_per_block"]
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        bare = key.removeprefix("model.").removeprefix("diffusion_model.")
        match = _ORIGINAL_KEY.match(bare)
        if match is None:
            unknown.append(key)
            continue
        name = f"{_diffusers_block(match['block'], layers_per_block)}.{match['tensor']}"
        converted[name.replace("norm2_mem.", "norm_mem.")] = tensor
    if unknown:
        raise AdapterWeightsError(
            f"checkpoint {src} has tensors that are not DreamCache adapter weights:\n  " + "\n  ".join(sorted(unknown))
        )

    unet = unet if unet is not None else build_unet(architecture)
    present = sorted({_LAYER_PREFIX.match(key)[1] for key in converted})
    for preset in PRESETS:
        layers = resolve_preset(unet, preset)
        if sorted(layer.name for layer in layers) == present:
            break
    else:
        raise AdapterWeightsError(
            f"checkpoint {src} has adapters on {', '.join(present)}, which is no known layer preset of {architecture}"
        )
    check_state_dict(converted, layers, str(src))
    config = AdapterConfig.for_layers(preset, layers, base_model=f"{architecture} (converted from {src.name})",
                                      recommended=AUTHORS_INFERENCE)
    save_adapters(dst, _adapters_from_state(converted, layers), config)
    return config
