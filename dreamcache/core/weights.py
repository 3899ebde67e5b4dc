"""Adapter weights on disk: `adapter_config.json` (`adapter_config`) + `adapter_model.safetensors`, adapters only.

Also the converter for the authors' released checkpoint (a pickled state dict with
latent-diffusion key names), which is the only place a `.pt` file is ever opened, and then
with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dreamcache.core.adapter import DreamCacheAdapter
# What the weights are for lives beside them, readable without torch; its names are this module's too.
from dreamcache.core.adapter_config import (  # noqa: F401
    AUTHORS_INFERENCE, AUTHORS_NEGATIVE_PROMPT, CONFIG_NAME, FORMAT, AdapterConfig, LayerSpec, Recommended,
    read_adapter_config,
)
from dreamcache.core.architectures import build_unet, unet_config
from dreamcache.core.cache import model_fingerprint
from dreamcache.core.errors import AdapterWeightsError
from dreamcache.core.layers import PRESETS, Layer, resolve_preset

WEIGHTS_NAME = "adapter_model.safetensors"


FINGERPRINT_PREFIX = "fingerprint:"


def base_identity(name_or_path: str | Path | None, unet: torch.nn.Module, vae: torch.nn.Module) -> str:
    """How an adapter config names the base its adapters were trained on: a hub id as given; a folder of
    this machine (or a model built in memory) by its weights' fingerprint (`cache.model_fingerprint` of
    the UNet and VAE, without adapters), as the folder's path means nothing on another machine.

    The fingerprint rounds each sampled weight to float16: a float32 or float16 copy of the same weights
    gives the same identity, a bfloat16 one does not (load the base in float16 or float32 to name it).
    """
    name = str(name_or_path or "")
    if name and not Path(name).expanduser().exists():
        return name  # from_pretrained found no folder by this name: a hub id
    return FINGERPRINT_PREFIX + model_fingerprint(unet, vae)


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
