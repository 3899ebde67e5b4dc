"""Which transformers of a UNet carry DreamCache adapters.

Presets are resolved from the UNet's own structure, not from hard-coded module names, so the
same names work for SD 1.5, SD 2.1, SDXL and the tiny models. The transformers are listed in
forward order per stage (encoder, middle, decoder); the released DreamCache model uses the
middle transformer and the decoder transformers at odd positions (1, 3, 5, 7 of SD's nine).
For SDXL the same rule gives the middle transformer and decoder positions 1, 3, 5 of its six
(`up_blocks.0.attentions.1`, `up_blocks.1.attentions.0`, `up_blocks.1.attentions.2`); the
adapter sits in the first `BasicTransformerBlock` of each selected transformer, where SD has
its only one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the presets are read where diffusers is not loaded (the CLI's options)
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

PRESETS: dict[str, str] = {
    "default": "middle transformer and decoder transformers at odd positions (the released model)",
    "middle": "the middle transformer only",
    "decoder": "decoder transformers at odd positions only",
    "encoder": "every encoder transformer",
    "all": "every transformer: encoder, middle and decoder",
}


@dataclass(frozen=True)
class Layer:
    """One transformer that receives an adapter, with what the cache holds there."""

    name: str  # module path in the UNet, e.g. "up_blocks.1.attentions.1"
    stage: str  # "encoder", "middle" or "decoder"
    channels: int  # width of the cached tokens (the transformer's input channels)
    inner_dim: int  # width of the transformer block the adapter sits in
    heads: int  # heads of that block's self-attention, reused by the memory attention
    downsample: int  # spatial stride relative to the latent: tokens = (latent / downsample) ** 2

    def tokens(self, resolution: int, vae_scale: int = 8) -> int:
        side = resolution // vae_scale // self.downsample
        return side * side

    @property
    def adapter_parameters(self) -> int:
        # query LayerNorm (2d), to_q (d^2), to_k and to_v (c*d each), to_out (d^2 + d), linear_cat (2d^2 + d)
        d, c = self.inner_dim, self.channels
        return 2 * d + d * d + 2 * c * d + d * d + d + 2 * d * d + d


def transformers(unet: UNet2DConditionModel) -> list[Layer]:
    """Every Transformer2DModel of the UNet in forward order, with its stage and stride."""
    found: list[Layer] = []
    strides: list[int] = []
    stride = 1
    for i, block in enumerate(unet.down_blocks):
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            found.append(_layer(f"down_blocks.{i}.attentions.{j}", "encoder", attn, stride))
        strides.append(stride)
        if getattr(block, "downsamplers", None):
            stride *= 2
    for j, attn in enumerate(getattr(unet.mid_block, "attentions", None) or []):
        found.append(_layer(f"mid_block.attentions.{j}", "middle", attn, stride))
    # Each decoder block works at the resolution of the encoder block it mirrors.
    for i, block in enumerate(unet.up_blocks):
        up_stride = strides[len(unet.up_blocks) - 1 - i]
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            found.append(_layer(f"up_blocks.{i}.attentions.{j}", "decoder", attn, up_stride))
    return found


def _layer(name: str, stage: str, attn: Transformer2DModel, downsample: int) -> Layer:
    block = attn.transformer_blocks[0]
    return Layer(
        name=name,
        stage=stage,
        channels=attn.config.in_channels,
        inner_dim=block.attn1.inner_dim,
        heads=block.attn1.heads,
        downsample=downsample,
    )


def resolve_preset(unet: UNet2DConditionModel, preset: str = "default") -> list[Layer]:
    """The layers a named preset selects on this UNet, in forward order."""
    if preset not in PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; choose one of {', '.join(PRESETS)}")
    every = transformers(unet)
    encoder = [layer for layer in every if layer.stage == "encoder"]
    middle = [layer for layer in every if layer.stage == "middle"]
    decoder_odd = [layer for i, layer in enumerate(l for l in every if l.stage == "decoder") if i % 2 == 1]
    chosen = {
        "default": middle + decoder_odd,
        "middle": middle,
        "decoder": decoder_odd,
        "encoder": encoder,
        "all": every,
    }[preset]
    if not chosen:
        raise ValueError(f"layer preset {preset!r} selects no transformer on this UNet")
    return chosen
