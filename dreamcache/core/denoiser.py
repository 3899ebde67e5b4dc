"""One guided denoising step, and the fast ways of running it on a GPU.

A step evaluates the UNet once per pass of the guidance mode (see `guidance.py`) in one batch and
combines the predictions. `FastPaths` says how:

share_encoder  combined guidance computes the encoder half once for its two empty-prompt passes
               (`unet_halves.py`): 2n encoder rows instead of 3n, same numbers
compile        the UNet halves go through `torch.compile` (inductor): fused normalisation,
               activation and attention-projection kernels
cuda_graphs    each step is captured once per batch layout and replayed: the Python and launch
               cost of ~1,000 kernels a step, which dominates below batch ~16, is paid once
static_batch   a short last batch is padded to the batch size, so a run sees one shape and the
               compiled kernels and captured graphs are reused rather than rebuilt
channels_last  the UNet's and the VAE's weights in channels-last memory format: convolutions, 55% of
               a step's FLOPs, run on Tensor Cores without layout transposes (+7% images/s for
               joint guidance at batch 32 on an H200, bench/results/levers_h200.json); same values

Every fast path computes the eager step's function; tests/dreamcache/test_denoiser.py holds them
to the eager fp32 path, and bench/speed.py does on the GPU.

Feature reuse across steps (`DeepReuse`, the DeepCache idea) is not a fast path: it changes the
numbers. With an interval N, every N-th step runs the whole UNet and keeps its deep features (the
input of the last decoder block, `unet_halves.decode_deep`); the steps in between run only the
shallow path (conv_in, the first encoder block, the last decoder block) on those kept features. The
kept features have one row per decoder row, so the uncached, cached and text passes of combined
guidance each reuse their own, with the adapters' injection in them as of the last full step; the
adapters of the last decoder block inject the cache at every step. Interval 1 is the plain step.
Reusing steps run without CUDA graphs (their compiled halves still run): a batch alternates two kinds
of step, and the graphs capture one.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator, Mapping

import torch
from diffusers import UNet2DConditionModel

from dreamcache.core.adapter import LayerMemory, PreparedMemory, dreamcache_processors, use_memory
from dreamcache.core.adapter_config import check_reuse_interval  # noqa: F401 (its home; callers import it here too)
from dreamcache.core.guidance import COMBINED, EVALUATIONS, Guidance, combine
from dreamcache.core.unet_halves import (
    EncoderHalf, can_share_encoder, decode, decode_deep, decode_shallow, encode, supports_halves,
)

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scaled latents (n, ...), timestep) -> eps (n, ...)


@dataclass(frozen=True)
class FastPaths:
    share_encoder: bool = True  # exact, so on everywhere unless a benchmark turns it off
    compile: bool = False
    cuda_graphs: bool = False
    static_batch: bool = False
    channels_last: bool = False

    @classmethod
    def off(cls) -> "FastPaths":
        """Eager and unshared: the plain diffusers way of evaluating the passes (the benchmark's baseline)."""
        return cls(share_encoder=False)

    @classmethod
    def gpu(cls) -> "FastPaths":
        return cls(share_encoder=True, compile=True, cuda_graphs=True, static_batch=True, channels_last=True)

    @classmethod
    def for_device(cls, device: torch.device | str) -> "FastPaths":
        """Everything on for CUDA (the GPU workers' default); on CPU only the exact encoder sharing."""
        return cls.gpu() if torch.device(device).type == "cuda" else cls()


@dataclass
class StepPlan:
    """What stays fixed across the steps of one batch."""

    mode: Guidance
    rows: int  # n: images in the batch
    encoder_states: torch.Tensor  # (k_enc * n, L, D): prompt embedding of each encoder row
    decoder_states: torch.Tensor  # (k * n, L, D): prompt embedding of each decoder row
    shared_rows: torch.Tensor | None  # (k * n,): the encoder row feeding each decoder row, when shared
    image_scale: float
    text_scale: float
    # (n, 1, h, w) in [0, 1]: where the image guidance acts (placed products: near the product); None: everywhere
    image_region: torch.Tensor | None = None

    @classmethod
    def make(cls, mode: Guidance, text: torch.Tensor, empty: torch.Tensor, share_encoder: bool,
             image_scale: float, text_scale: float, image_region: torch.Tensor | None = None) -> "StepPlan":
        """text, empty: (n, L, D). Rows are stacked per pass in EVALUATIONS order. `image_region` needs
        combined guidance: joint guidance has no image term of its own to limit."""
        if image_region is not None and mode != COMBINED:
            raise ValueError(f"an image guidance region needs {COMBINED} guidance, not {mode}")
        n = text.shape[0]
        by_pass = {"plain": empty, "image": empty, "full": text}
        passes = EVALUATIONS[mode]
        decoder_states = torch.cat([by_pass[p] for p in passes])
        shared_rows = None
        encoder_states = decoder_states
        if share_encoder and mode == COMBINED:
            # The plain and image passes differ only in the decoder: one encoder row block feeds both.
            encoder_states = torch.cat([empty, text])
            n_idx = torch.arange(n, device=text.device)
            shared_rows = torch.cat([n_idx, n_idx, n_idx + n])
        return cls(mode, n, encoder_states, decoder_states, shared_rows, image_scale, text_scale, image_region)

    @property
    def image_scales(self) -> float | torch.Tensor:
        """The image scale, per latent cell where a region limits it."""
        return self.image_scale if self.image_region is None else self.image_scale * self.image_region

    @property
    def encoder_passes(self) -> int:
        return self.encoder_states.shape[0] // self.rows


def guided_eps(unet: UNet2DConditionModel, latents: torch.Tensor, t: torch.Tensor, plan: StepPlan,
               encode_fn=encode, decode_fn=decode) -> torch.Tensor:
    """The guided noise prediction for (n, C, h, w) scaled latents at timestep t.

    With `encode_fn=None` the UNet runs whole (architectures `unet_halves` does not cover).
    """
    x = torch.cat([latents] * plan.encoder_passes)  # (k_enc * n, C, h, w)
    if encode_fn is None:
        eps = unet(x, t, encoder_hidden_states=plan.decoder_states).sample
        return combine(plan.mode, eps, plan.image_scales, plan.text_scale)
    half = encode_fn(unet, x, t, plan.encoder_states)
    if plan.shared_rows is not None:
        half = half.rows(plan.shared_rows)  # (k * n, ...): the plain and image passes share rows
    eps = decode_fn(unet, half, plan.decoder_states)
    return combine(plan.mode, eps, plan.image_scales, plan.text_scale)


@dataclass
class DeepReuse:
    """One batch's deep features, computed every `interval` steps and reused by the steps in between (made
    afresh for each batch: a batch's first step is a full one)."""

    interval: int
    step: int = 0  # steps taken in this batch
    deep: torch.Tensor | None = None  # (k * n, C, H, W): the last decoder block's input at the last full step

    def __post_init__(self):
        check_reuse_interval(self.interval)

    @property
    def full_step(self) -> bool:
        return self.deep is None or self.step % self.interval == 0


def reused_eps(unet: UNet2DConditionModel, latents: torch.Tensor, t: torch.Tensor, plan: StepPlan, reuse: DeepReuse,
               encode_fn=encode, decode_deep_fn=decode_deep, decode_shallow_fn=decode_shallow) -> torch.Tensor:
    """`guided_eps` with the deep path run only on `reuse`'s full steps (the shallow path at every step)."""
    full = reuse.full_step
    x = torch.cat([latents] * plan.encoder_passes)  # (k_enc * n, C, h, w)
    half: EncoderHalf = encode_fn(unet, x, t, plan.encoder_states, blocks=None if full else 1)
    if plan.shared_rows is not None:
        half = half.rows(plan.shared_rows)  # (k * n, ...): the plain and image passes share rows
    if full:
        reuse.deep = decode_deep_fn(unet, half, plan.decoder_states)  # (k * n, C, H, W)
    eps = decode_shallow_fn(unet, reuse.deep, half, plan.decoder_states)
    reuse.step += 1
    return combine(plan.mode, eps, plan.image_scale, plan.text_scale)


class Denoiser:
    """Runs the guided steps of a pipeline's batches with the fast paths it was given."""

    max_graphs = 8  # captured batch layouts kept (each holds a few hundred MB of activations)

    def __init__(self, unet: UNet2DConditionModel, fast: FastPaths):
        self.unet, self.fast = unet, fast
        if fast.cuda_graphs and unet.device.type != "cuda":
            raise ValueError("CUDA graphs need the UNet on a CUDA device; use FastPaths.for_device(...)")
        self._encode, self._decode = (encode, decode) if supports_halves(unet) else (None, None)
        self._decode_deep, self._decode_shallow = decode_deep, decode_shallow
        if fast.compile and self._encode is not None:
            self._encode, self._decode = torch.compile(encode), torch.compile(decode)
            # Compiled on first use, so only when a batch reuses deep features.
            self._decode_deep, self._decode_shallow = torch.compile(decode_deep), torch.compile(decode_shallow)
        self._graphs: OrderedDict[tuple, _CapturedStep] = OrderedDict()
        self._pool = None

    def share_encoder(self, layers) -> bool:
        return self.fast.share_encoder and can_share_encoder(self.unet, layers)

    @contextmanager
    def batch(self, plan: StepPlan, memory: Mapping[str, LayerMemory] | None,
              deep_reuse_interval: int | None = None) -> Iterator[Step]:
        """The step function for one batch, with its subjects' memory attached while it runs.

        With `deep_reuse_interval` N, the deep path runs at the batch's steps 0, N, 2N, ... (`DeepReuse`).
        """
        reuse = None if deep_reuse_interval is None else DeepReuse(deep_reuse_interval)
        if reuse is not None and self._encode is None:
            raise ValueError("deep feature reuse needs a Stable Diffusion UNet (no class, addition or timestep-"
                             "condition embeddings); sample this UNet with deep_reuse_interval=None")
        with use_memory(self.unet, memory):
            if reuse is not None:
                yield lambda latents, t: reused_eps(self.unet, latents, t, plan, reuse, self._encode,
                                                    self._decode_deep, self._decode_shallow)
            elif not self.fast.cuda_graphs:
                yield lambda latents, t: guided_eps(self.unet, latents, t, plan, self._encode, self._decode)
            else:
                yield self._captured(plan)

    def _captured(self, plan: StepPlan) -> Step:
        processors = dreamcache_processors(self.unet)
        memories = {name: p.memory for name, p in processors.items()}
        current: _CapturedStep | None = None

        def step(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal current
            if current is None:  # once per batch: find (or capture) the graph of this layout, load the batch
                current = self._graph_for(plan, processors, memories, latents, t)
            return current.step(latents, t)

        return step

    def _graph_for(self, plan, processors, memories, latents, t) -> "_CapturedStep":
        key = (_shape(latents), _shape(t), *_layout_key(plan, memories))
        captured = self._graphs.pop(key, None)
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            captured = _CapturedStep(self, plan, processors, memories, latents, t)
        else:
            captured.load(plan, memories)
        self._graphs[key] = captured
        return captured


def _shape(t: torch.Tensor | None):
    return None if t is None else (tuple(t.shape), t.dtype, t.device)


def _layout_key(plan: StepPlan, memories: Mapping[str, PreparedMemory | None]) -> tuple:
    mem = tuple((name, None if m is None else (_shape(m.keys), _shape(m.rows), _shape(m.mask)))
                for name, m in sorted(memories.items()))
    return (plan.mode, plan.rows, _shape(plan.encoder_states), _shape(plan.decoder_states),
            _shape(plan.shared_rows), plan.image_scale, plan.text_scale, _shape(plan.image_region), mem)


class _CapturedStep:
    """One batch layout's step as a CUDA graph over static input buffers."""

    def __init__(self, denoiser: Denoiser, plan: StepPlan, processors, memories, latents, t):
        # The graph reads the batch's embeddings and the adapters' memory from these buffers; later
        # batches of the same layout copy theirs in (`load`).
        self.plan = _static_copy(plan)
        self.memories = {name: None if m is None else _static_copy(m) for name, m in memories.items()}
        unet = denoiser.unet
        self.latents, self.t = latents.clone(), t.clone()

        def run():
            return guided_eps(unet, self.latents, self.t, self.plan, denoiser._encode, denoiser._decode)

        originals = {name: p.memory for name, p in processors.items()}
        try:
            for name, p in processors.items():
                p.memory = self.memories[name]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph: compilation, autotuning, cuBLAS handles
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=denoiser._pool):
                self.eps = run()
        finally:
            for name, p in processors.items():
                p.memory = originals[name]

    def load(self, plan: StepPlan, memories: Mapping[str, PreparedMemory | None]) -> None:
        _copy_into(self.plan, plan)
        for name, m in memories.items():
            if m is not None:
                _copy_into(self.memories[name], m)

    def step(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.latents.copy_(latents)
        self.t.copy_(t)
        self.graph.replay()
        return self.eps.clone()  # the next replay overwrites the graph's output


def _static_copy(obj):
    """A copy of a dataclass whose tensor fields are fresh buffers (the graph's static inputs)."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    return replace(obj, **{name: v.clone() for name, v in values.items() if isinstance(v, torch.Tensor)})


def _copy_into(static, obj) -> None:
    """Copy obj's tensor fields into a `_static_copy`: the layout key fixes which are present and their shapes."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            getattr(static, f.name).copy_(value)
