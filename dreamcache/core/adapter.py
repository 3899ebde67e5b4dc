"""The DreamCache adapter: attention over cached reference features inside a transformer block.

For a selected `BasicTransformerBlock` with input `x` and the subject's cached tokens `m`
(method note, section 3):

    mem = Attention(query = LayerNorm_mem(x), key/value = m)
    x   = x + Linear_cat(concat([SelfAttn(norm1(x)), mem]))     if m is present
    x   = x + SelfAttn(norm1(x))                                 otherwise: the base block

The adapter is an `nn.Module` owned by an attention processor that wraps the block's own
self-attention processor (the diffusers pattern for methods with extra weights). The processor
needs the block's input `x`, which diffusers hands only to the block, so a forward pre-hook on
the block records it. Base weights are never touched, and a row without a cache goes through
the base processor alone, which is what makes "no cache" bit-identical to the base UNet.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dreamcache.core.layers import Layer

if TYPE_CHECKING:  # only named here: loading adapters or caches needs no diffusers import
    from diffusers import UNet2DConditionModel


@dataclass
class LayerMemory:
    """The cached tokens one layer attends to, for the rows of the batch that carry a cache."""

    tokens: torch.Tensor  # (R, M, C): one row per batch row with a cache, padded to the longest
    rows: torch.Tensor | None  # (R,) batch indices of those rows; None when every row has a cache
    mask: torch.Tensor | None  # (R, M) True at real tokens; None when no row is padded


@dataclass
class PreparedMemory:
    """A layer's memory as the adapter uses it at every step: keys and values already projected."""

    keys: torch.Tensor  # (R, h, M, d/h)
    values: torch.Tensor  # (R, h, M, d/h)
    rows: torch.Tensor | None
    mask: torch.Tensor | None


class MemoryAttention(nn.Module):
    """Multi-head attention from the block's tokens (queries) to the cached tokens (keys, values)."""

    def __init__(self, dim: int, memory_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"adapter width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(memory_dim, dim, bias=False)
        self.to_v = nn.Linear(memory_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list to keep the released key names

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the cached tokens once per sampling call: they are the same at every step."""
        b, h = memory.shape[0], self.heads
        k = self.to_k(memory).view(b, -1, h, self.to_k.out_features // h).transpose(1, 2)  # (B, h, M, d/h)
        v = self.to_v(memory).view(b, -1, h, self.to_v.out_features // h).transpose(1, 2)  # (B, h, M, d/h)
        return k, v

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, h, N, d/h)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M), True = attend
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)  # (B, h, N, d/h)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, d))


class DreamCacheAdapter(nn.Module):
    """The trained weights of one selected layer: 6d^2 + 4d parameters when d = c."""

    def __init__(self, dim: int, memory_dim: int, heads: int):
        super().__init__()
        self.norm_mem = nn.LayerNorm(dim)
        self.attn_mem = MemoryAttention(dim, memory_dim, heads)
        self.linear_cat = nn.Linear(2 * dim, dim)

    @classmethod
    def for_layer(cls, layer: Layer) -> "DreamCacheAdapter":
        return cls(layer.inner_dim, layer.channels, layer.heads)

    def prepare(self, memory: LayerMemory) -> PreparedMemory:
        keys, values = self.attn_mem.keys_values(memory.tokens)
        return PreparedMemory(keys, values, memory.rows, memory.mask)

    def forward(self, x: torch.Tensor, self_attn: torch.Tensor, memory: PreparedMemory) -> torch.Tensor:
        mem = self.attn_mem(self.norm_mem(x), memory.keys, memory.values, memory.mask)  # (B, N, d)
        return self.linear_cat(torch.cat([self_attn, mem], dim=-1))  # (B, N, 2d) -> (B, N, d)


class DreamCacheAttnProcessor(nn.Module):
    """Self-attention processor of a selected block: the base processor, plus the adapter for cached rows."""

    def __init__(self, layer_name: str, adapter: DreamCacheAdapter, base_processor):
        super().__init__()
        self.layer_name = layer_name
        self.adapter = adapter
        # Kept out of the module tree on purpose: its weights (if any) belong to the base model.
        self.__dict__["base_processor"] = base_processor
        self.memory: PreparedMemory | None = None
        self._block_input: torch.Tensor | None = None
        self.hook = None  # the block's forward pre-hook that records its input, while installed

    def record_block_input(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        self._block_input = args[0] if args else kwargs["hidden_states"]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        x, self._block_input = self._block_input, None
        memory = self.memory
        if memory is None:
            return out
        if memory.rows is None:
            return self.adapter(x, out, memory)
        fused = self.adapter(x[memory.rows], out[memory.rows], memory)
        return out.index_copy(0, memory.rows, fused)


def _selected_block(unet: UNet2DConditionModel, layer_name: str):
    try:
        transformer = unet.get_submodule(layer_name)
        block = transformer.transformer_blocks[0]
    except (AttributeError, IndexError) as exc:
        raise ValueError(f"layer {layer_name!r} is not a transformer of this UNet") from exc
    if getattr(block, "norm_type", None) != "layer_norm" or block.only_cross_attention:
        raise ValueError(
            f"layer {layer_name!r}: DreamCache adapters need a pre-LayerNorm block with self-attention "
            f"(Stable Diffusion's), found norm_type={getattr(block, 'norm_type', None)!r}"
        )
    return block


def apply_dreamcache(
    unet: UNet2DConditionModel, adapters: Mapping[str, DreamCacheAdapter], dtype: torch.dtype | None = None
) -> None:
    """Install adapters (layer name -> adapter) on the UNet's device, in `dtype` (default: the UNet's).

    Training keeps the adapters in float32 (`dtype=torch.float32`) under a half-precision UNet.
    """
    remove_dreamcache(unet)
    for name, adapter in adapters.items():
        block = _selected_block(unet, name)
        adapter.to(device=unet.device, dtype=dtype or unet.dtype)
        processor = DreamCacheAttnProcessor(name, adapter, block.attn1.processor)
        block.attn1.set_processor(processor)
        processor.hook = block.register_forward_pre_hook(processor.record_block_input, with_kwargs=True)


def remove_dreamcache(unet: UNet2DConditionModel) -> None:
    """Restore the base processors and remove the hooks: the UNet is the base UNet again."""
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, DreamCacheAttnProcessor):
            processor.hook.remove()
            module.set_processor(processor.base_processor)  # also drops the adapter from the module's children


def dreamcache_processors(unet: UNet2DConditionModel) -> dict[str, DreamCacheAttnProcessor]:
    return {
        m.processor.layer_name: m.processor
        for m in unet.modules()
        if isinstance(getattr(m, "processor", None), DreamCacheAttnProcessor)
    }


def set_memory(unet: UNet2DConditionModel, memory: Mapping[str, LayerMemory] | None) -> None:
    """Give each adapted layer its cached tokens for the next forward passes (None: no cache).

    The adapters' keys and values are projected here, once, not at every denoising step; under
    autograd (training) the projection stays in the graph, so its weights still get gradients.
    """
    processors = dreamcache_processors(unet)
    if memory is not None:
        missing = sorted(set(processors) - set(memory))
        if missing:
            raise ValueError(f"no cached tokens for adapted layer(s) {', '.join(missing)}")
    for name, processor in processors.items():
        processor.memory = None if memory is None else processor.adapter.prepare(memory[name])


@contextmanager
def use_memory(unet: UNet2DConditionModel, memory: Mapping[str, LayerMemory] | None) -> Iterator[None]:
    set_memory(unet, memory)
    try:
        yield
    finally:
        set_memory(unet, None)
