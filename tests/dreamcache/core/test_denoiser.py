"""The fast paths compute the eager step's function (issue 9): UNet halves, the shared encoder,
static batches, compiled halves. CUDA graphs need a GPU: bench/speed.py checks them there."""

import numpy as np
import pytest
import torch

from dreamcache.core.adapter import set_memory, use_memory
from dreamcache.core.cache import collate_memory
from dreamcache.core.denoiser import Denoiser, FastPaths
from dreamcache.core.unet_halves import can_share_encoder, decode, encode
from tests.helpers import make_tiny_pipeline, product_image


def _inputs(pipe, batch, side=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = side or pipe.unet.config.sample_size
    return (torch.randn(batch, 4, side, side, generator=g), torch.tensor(700),
            torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g))


@pytest.mark.parametrize("side", [None, 6])  # 6: not a multiple of the upsampling, explicit upsample sizes
def test_the_two_halves_are_the_unet(tiny_pipe, side):
    latents, t, text = _inputs(tiny_pipe, 3, side)
    cache = tiny_pipe.cache_subject(product_image())
    memory = collate_memory([None, cache, cache], [l.name for l in tiny_pipe.dreamcache_layers], "cpu", torch.float32)
    with torch.no_grad(), use_memory(tiny_pipe.unet, memory):
        whole = tiny_pipe.unet(latents, t, encoder_hidden_states=text).sample
        halves = decode(tiny_pipe.unet, encode(tiny_pipe.unet, latents, t, text), text)
    assert torch.equal(whole, halves)


def _images(pipe, fast, guidance="combined", prompts=("a red mug", "a blue lamp", "a box"), batch_size=8,
            deep_reuse_interval=None):
    caches = [pipe.cache_subject(product_image(c)) for c in ((220, 20, 20), (20, 20, 220))]
    pipe.enable_fast_paths(fast)
    try:
        out = pipe(list(prompts), subject=[caches[i % 2] for i in range(len(prompts))], seed=[5, 6, 7][: len(prompts)],
                   guidance=guidance, num_inference_steps=4, batch_size=batch_size, output_type="np", progress=False,
                   deep_reuse_interval=deep_reuse_interval)
    finally:
        pipe.enable_fast_paths(FastPaths())
    return np.stack(out.images)


def test_sharing_the_encoder_half_leaves_combined_guidance_unchanged(tiny_pipe):
    shared = _images(tiny_pipe, FastPaths(share_encoder=True))
    unshared = _images(tiny_pipe, FastPaths(share_encoder=False))
    assert np.abs(shared - unshared).max() < 1e-5
    assert shared.std() > 0.01  # real images, not a constant that would match anything


def test_encoder_adapters_forbid_sharing():
    pipe = make_tiny_pipeline()
    pipe.load_dreamcache(preset="all")
    assert not can_share_encoder(pipe.unet, pipe.dreamcache_layers)
    assert not Denoiser(pipe.unet, FastPaths()).share_encoder(pipe.dreamcache_layers)
    pipe.load_dreamcache(preset="default")
    assert Denoiser(pipe.unet, FastPaths()).share_encoder(pipe.dreamcache_layers)


def test_static_batches_pad_to_a_power_of_two_and_drop_the_copies(tiny_pipe):
    rows = []
    hook = tiny_pipe.unet.conv_out.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        padded = _images(tiny_pipe, FastPaths(static_batch=True), guidance="joint", batch_size=8)
    finally:
        hook.remove()
    exact = _images(tiny_pipe, FastPaths(), guidance="joint", batch_size=8)
    assert padded.shape == exact.shape == (3, *exact.shape[1:])
    assert set(rows) == {2 * 4}  # 3 images padded to 4, two passes each
    assert np.abs(padded - exact).max() < 1e-5


@pytest.mark.slow  # torch.compile on the CPU: inductor builds C++ kernels
def test_compiled_halves_match_eager_fp32(tiny_pipe):
    """Inductor on the CPU: the same graph rewriting the GPU workers get, held to 1e-4 of eager fp32, at every
    step and with deep feature reuse (issue 35). One test, so that both share the compiled encoder half and
    VAE decoder: on CI's cold inductor cache, compiling is nearly all of this test's time."""
    prompts = ("a red mug", "a blue lamp", "a box")
    for interval in (None, 3):
        eager = _images(tiny_pipe, FastPaths(), prompts=prompts, deep_reuse_interval=interval)
        compiled = _images(tiny_pipe, FastPaths(compile=True), prompts=prompts, deep_reuse_interval=interval)
        assert np.abs(compiled - eager).max() < 1e-4, f"deep_reuse_interval {interval}"


def test_channels_last_weights_give_the_same_images(tiny_pipe):
    tiny_pipe.enable_fast_paths(FastPaths(channels_last=True))
    assert tiny_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert tiny_pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    eager = _images(tiny_pipe, FastPaths(), prompts=("a red mug", "a blue lamp"))
    assert tiny_pipe.unet.conv_in.weight.is_contiguous()  # back to the plain layout
    last = _images(tiny_pipe, FastPaths(channels_last=True), prompts=("a red mug", "a blue lamp"))
    assert np.abs(last - eager).max() < 1e-4


def test_cuda_graphs_on_a_cpu_pipeline_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match="CUDA graphs need the UNet on a CUDA device"):
        tiny_pipe.enable_fast_paths(FastPaths(cuda_graphs=True))
    assert FastPaths.for_device("cpu") == FastPaths(share_encoder=True)
    assert FastPaths.for_device("cuda") == FastPaths.gpu()


def test_projected_memory_still_trains_the_key_and_value_weights():
    pipe = make_tiny_pipeline()
    pipe.load_dreamcache(dtype=torch.float32)
    cache = pipe.cache_subject(product_image())
    latents, t, text = _inputs(pipe, 1)
    set_memory(pipe.unet, collate_memory([cache], [l.name for l in pipe.dreamcache_layers], "cpu", torch.float32))
    try:
        pipe.unet(latents, t, encoder_hidden_states=text).sample.square().mean().backward()
    finally:
        set_memory(pipe.unet, None)
    for adapter in pipe.dreamcache_adapters.values():
        assert adapter.attn_mem.to_k.weight.grad.abs().sum() > 0
        assert adapter.attn_mem.to_v.weight.grad.abs().sum() > 0
