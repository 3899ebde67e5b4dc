"""The UNet as two halves, so passes that differ only after the encoder can share it.

Combined guidance evaluates (no cache, empty prompt), (cache, empty prompt) and (cache, text).
With adapters only in the middle block and the decoder (the released preset), the first two are
the same computation up to the middle block: same latents, same timestep, same empty prompt, no
adapter on the way. So the encoder half runs on 2n rows, [latents | empty] and [latents | text],
and its outputs are repeated into the 3n rows of the decoder half (method note, section 4).

`decode(unet, encode(unet, x, t, text), text)` is exactly `unet(x, t, text).sample`: the same
modules called in the same order as diffusers' `UNet2DConditionModel.forward`, for the Stable
Diffusion configurations (no class, addition or timestep-condition embeddings); `supports_halves`
says whether a UNet is one of them.

The decoder half splits again for feature reuse across steps (DeepCache; `denoiser.py`): its deep
path (the middle block and every decoder block but the last) ends in the input of the last decoder
block, and its shallow path is that block and the output layers, which read only the first encoder
block's skips. `decode` is `decode_shallow(decode_deep(...))`, the same modules in the same order;
a step that reuses the deep features runs `encode(..., blocks=1)` and `decode_shallow` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from dreamcache.core.layers import Layer


@dataclass
class EncoderHalf:
    """What the decoder half needs from the encoder half, one row per evaluated batch row."""

    sample: torch.Tensor  # (B, C, h, w): the middle block's input
    residuals: tuple[torch.Tensor, ...]  # skip connections, in the order the encoder produced them
    emb: torch.Tensor  # (B, E): timestep embedding

    def rows(self, index: torch.Tensor) -> "EncoderHalf":
        """The same outputs for the rows in `index` (repeats allowed)."""
        return EncoderHalf(
            sample=self.sample.index_select(0, index),
            residuals=tuple(r.index_select(0, index) for r in self.residuals),
            emb=self.emb.index_select(0, index),
        )


def supports_halves(unet: UNet2DConditionModel) -> bool:
    c = unet.config
    return (
        c.class_embed_type is None and c.num_class_embeds is None and c.addition_embed_type is None
        and c.encoder_hid_dim is None and c.time_cond_proj_dim is None and not c.center_input_sample
        and getattr(unet, "time_embed_act", None) is None
    )


def can_share_encoder(unet: UNet2DConditionModel, layers: tuple[Layer, ...] | list[Layer]) -> bool:
    """The encoder half may be shared between cached and uncached rows: no adapter lives in it."""
    return supports_halves(unet) and all(layer.stage != "encoder" for layer in layers)


def encode(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
           encoder_hidden_states: torch.Tensor, blocks: int | None = None) -> EncoderHalf:
    """The encoder half; with `blocks`, only the first `blocks` encoder blocks (the shallow path's)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
    h = unet.conv_in(sample)
    residuals: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks[:blocks]:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, res = block(hidden_states=h, temb=emb)
        residuals += res
    return EncoderHalf(sample=h, residuals=residuals, emb=emb)


def decode(unet: UNet2DConditionModel, half: EncoderHalf, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    return decode_shallow(unet, decode_deep(unet, half, encoder_hidden_states), half, encoder_hidden_states)


def decode_deep(unet: UNet2DConditionModel, half: EncoderHalf, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """The middle block and every decoder block but the last: the last decoder block's input (B, C, H, W)."""
    emb, residuals = half.emb, half.residuals
    h = half.sample
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = unet.mid_block(h, emb)
    # Latent sides that are not multiples of the total upsampling need explicit upsample sizes.
    factor = 2 ** unet.num_upsamplers
    explicit_sizes = any(side % factor for side in residuals[0].shape[-2:])
    for block in unet.up_blocks[:-1]:
        skips, residuals = residuals[-len(block.resnets):], residuals[: -len(block.resnets)]
        size = residuals[-1].shape[2:] if explicit_sizes else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips,
                      encoder_hidden_states=encoder_hidden_states, upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, upsample_size=size)
    return h


def decode_shallow(unet: UNet2DConditionModel, deep: torch.Tensor, half: EncoderHalf,
                   encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """The last decoder block on `deep` with its skips (conv_in's and the first encoder block's), then the output.

    `half` may be a whole encoder half or the shallow one (`encode(..., blocks=1)`): the skips the last
    block reads are the first ones either way.
    """
    block = unet.up_blocks[-1]
    skips = half.residuals[: len(block.resnets)]
    if getattr(block, "has_cross_attention", False):
        h = block(hidden_states=deep, temb=half.emb, res_hidden_states_tuple=skips,
                  encoder_hidden_states=encoder_hidden_states, upsample_size=None)
    else:
        h = block(hidden_states=deep, temb=half.emb, res_hidden_states_tuple=skips, upsample_size=None)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
