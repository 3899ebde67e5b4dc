"""What DreamCache adds to a UNet: adapter parameters, cached tokens per layer, cache bytes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from dreamcache.core.architectures import SD_VAE_SCALE, build_unet
from dreamcache.core.layers import resolve_preset


@dataclass
class LayerReport:
    name: str
    stage: str
    tokens: int
    channels: int
    adapter_parameters: int


@dataclass
class Report:
    model: str
    preset: str
    resolution: int
    adapter_parameters: int
    layers: list[LayerReport]
    cache_values: int
    cache_dtype: str
    cache_bytes: int


def unet_from_base(base: str | Path) -> UNet2DConditionModel:
    """The UNet of a diffusers directory, built on the meta device from its config alone."""
    base = Path(base)
    for candidate in (base / "unet" / "config.json", base / "config.json"):
        if candidate.is_file():
            config = UNet2DConditionModel.load_config(candidate.parent)
            with torch.device("meta"):
                return UNet2DConditionModel.from_config(config)
    raise FileNotFoundError(f"no UNet config under {base} (looked for unet/config.json and config.json)")


def inspect_unet(
    unet: UNet2DConditionModel, model: str, preset: str = "default", resolution: int | None = None,
    dtype: str = "float16",
) -> Report:
    resolution = resolution or unet.config.sample_size * SD_VAE_SCALE
    layers = resolve_preset(unet, preset)
    reports = [
        LayerReport(layer.name, layer.stage, layer.tokens(resolution), layer.channels, layer.adapter_parameters)
        for layer in layers
    ]
    values = sum(r.tokens * r.channels for r in reports)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return Report(model, preset, resolution, sum(r.adapter_parameters for r in reports), reports, values, dtype,
                  values * itemsize)


def inspect_architecture(architecture: str, **kwargs) -> Report:
    return inspect_unet(build_unet(architecture), architecture, **kwargs)


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)


def to_text(report: Report) -> str:
    lines = [
        f"{report.model}, preset {report.preset!r}, {report.resolution}x{report.resolution}",
        f"adapter parameters: {report.adapter_parameters:,}",
        f"{'layer':<28} {'stage':<8} {'tokens':>7} x {'channels':<8} {'adapter params':>14}",
    ]
    lines += [f"{r.name:<28} {r.stage:<8} {r.tokens:>7} x {r.channels:<8} {r.adapter_parameters:>14,}"
              for r in report.layers]
    lines.append(f"cache per subject (one reference): {report.cache_values:,} values, "
                 f"{report.cache_bytes:,} bytes in {report.cache_dtype} ({report.cache_bytes / 1e6:.2f} MB)")
    return "\n".join(lines)
