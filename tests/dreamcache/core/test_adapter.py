import pytest
import torch

from dreamcache.core.adapter import DreamCacheAttnProcessor, dreamcache_processors, remove_dreamcache, set_memory, use_memory
from dreamcache.core.cache import collate_memory
from tests.helpers import make_tiny_pipeline, product_image


def unet_inputs(pipe, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = pipe.unet.config.sample_size
    latents = torch.randn(batch, 4, side, side, generator=g)
    text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([500] * batch), text


def forward(pipe, latents, t, text):
    with torch.no_grad():
        return pipe.unet(latents, t, encoder_hidden_states=text).sample


def test_without_cache_the_output_is_bit_identical_to_the_base():
    pipe = make_tiny_pipeline()
    inputs = unet_inputs(pipe, 3)
    base = forward(pipe, *inputs)
    pipe.load_dreamcache()
    assert torch.equal(forward(pipe, *inputs), base)


def test_attaching_never_changes_base_weights(tiny_pipe):
    base_state = {k: v.clone() for k, v in make_tiny_pipeline().unet.state_dict().items()}
    cache = tiny_pipe.cache_subject(product_image())
    latents, t, text = unet_inputs(tiny_pipe, 1)
    with use_memory(tiny_pipe.unet, collate_memory([cache], [l.name for l in tiny_pipe.dreamcache_layers], "cpu", torch.float32)):
        forward(tiny_pipe, latents, t, text)
    state = tiny_pipe.unet.state_dict()
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key
    adapter_keys = set(state) - set(base_state)
    assert adapter_keys and all(".processor.adapter." in key for key in adapter_keys)


def test_a_cache_changes_the_output(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    inputs = unet_inputs(tiny_pipe, 1)
    plain = forward(tiny_pipe, *inputs)
    names = [layer.name for layer in tiny_pipe.dreamcache_layers]
    with use_memory(tiny_pipe.unet, collate_memory([cache], names, "cpu", torch.float32)):
        personalised = forward(tiny_pipe, *inputs)
    assert (personalised - plain).abs().max() > 1e-3


def test_mixed_batch_rows_equal_running_each_alone(tiny_pipe):
    names = [layer.name for layer in tiny_pipe.dreamcache_layers]
    red = tiny_pipe.cache_subject(product_image((220, 20, 20)))
    # Two references: twice the tokens, so the batch has to pad and mask.
    blue = tiny_pipe.cache_subject([product_image((20, 20, 220)), product_image((20, 90, 200), shape="box")])
    rows = [red, None, blue, red]
    latents, t, text = unet_inputs(tiny_pipe, len(rows), seed=3)
    with use_memory(tiny_pipe.unet, collate_memory(rows, names, "cpu", torch.float32)):
        batched = forward(tiny_pipe, latents, t, text)
    for i, cache in enumerate(rows):
        memory = collate_memory([cache], names, "cpu", torch.float32)
        with use_memory(tiny_pipe.unet, memory):
            alone = forward(tiny_pipe, latents[i : i + 1], t[i : i + 1], text[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=2e-5, rtol=1e-4)


def test_unload_restores_the_plain_unet():
    pipe = make_tiny_pipeline()
    plain_processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    plain_keys = set(pipe.unet.state_dict())
    pipe.load_dreamcache()
    assert any(isinstance(p, DreamCacheAttnProcessor) for p in pipe.unet.attn_processors.values())
    pipe.unload_dreamcache()
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == plain_processors
    assert set(pipe.unet.state_dict()) == plain_keys
    assert not pipe.unet._forward_pre_hooks and all(not m._forward_pre_hooks for m in pipe.unet.modules())


def test_memory_must_cover_every_adapted_layer(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    memory = collate_memory([cache], ["mid_block.attentions.0"], "cpu", torch.float32)
    with pytest.raises(ValueError, match="up_blocks.1.attentions.1"):
        set_memory(tiny_pipe.unet, memory)


def test_remove_is_idempotent(tiny_pipe):
    remove_dreamcache(tiny_pipe.unet)
    remove_dreamcache(tiny_pipe.unet)
    assert dreamcache_processors(tiny_pipe.unet) == {}
