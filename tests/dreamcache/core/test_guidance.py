import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from dreamcache.core.denoiser import FastPaths
from dreamcache.core.guidance import combine, combined_guidance, joint_guidance
from tests.helpers import make_tiny_pipeline, product_image


def test_combined_guidance_by_hand():
    plain, image, full = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([7.0])
    # 1 + 0.5 * (3 - 1) + 2 * (7 - 3) = 10
    assert combined_guidance(plain, image, full, image_scale=0.5, text_scale=2.0).item() == 10.0
    # image scale 0: the text term alone, measured from the cached prediction
    assert combined_guidance(plain, image, full, image_scale=0.0, text_scale=1.0).item() == 5.0


def test_joint_guidance_by_hand():
    assert joint_guidance(torch.tensor([1.0]), torch.tensor([7.0]), scale=2.0).item() == 13.0


def test_combine_reads_the_stacked_order():
    stacked = torch.tensor([[1.0], [3.0], [7.0]])  # plain, image, full
    assert combine("combined", stacked, 0.5, 2.0).item() == 10.0
    assert combine("joint", stacked[[0, 2]], 0.0, 2.0).item() == 13.0
    with pytest.raises(ValueError, match="unknown guidance"):
        combine("triple", stacked, 0.5, 2.0)


def _rows_per_step(pipe, **kwargs):
    """Rows entering the UNet's encoder half (conv_in) and leaving its decoder half (conv_out), per step."""
    sizes = {"encoder": [], "decoder": []}
    hooks = [pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: sizes["encoder"].append(args[0].shape[0])),
             pipe.unet.conv_out.register_forward_pre_hook(lambda m, args: sizes["decoder"].append(args[0].shape[0]))]
    try:
        pipe(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


@pytest.mark.parametrize("guidance, share, encoder_rows, decoder_rows", [
    ("combined", True, 2, 3),  # the two empty-prompt passes share one encoder half
    ("combined", False, 3, 3),
    ("joint", True, 2, 2),
])
def test_evaluations_per_step(tiny_pipe, guidance, share, encoder_rows, decoder_rows):
    cache = tiny_pipe.cache_subject(product_image())
    tiny_pipe.enable_fast_paths(FastPaths(share_encoder=share))
    try:
        sizes = _rows_per_step(tiny_pipe, prompt=["a", "b"], subject=cache, guidance=guidance, num_inference_steps=3,
                               output_type="latent", progress=False)
    finally:
        tiny_pipe.enable_fast_paths(FastPaths())
    assert sizes == {"encoder": [encoder_rows * 2] * 3, "decoder": [decoder_rows * 2] * 3}


def test_text_only_is_exactly_diffusers_classifier_free_guidance():
    pipe = make_tiny_pipeline()
    reference = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items()})
    reference.set_progress_bar_config(disable=True)
    expected = reference(["a mug on a beach", "a lamp"], num_inference_steps=4, guidance_scale=6.0,
                         generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="np").images
    ours = pipe(["a mug on a beach", "a lamp"], seed=[3, 4], num_inference_steps=4, guidance_scale=6.0,
                output_type="np", progress=False).images
    np.testing.assert_allclose(np.stack(ours), expected, atol=1e-5)


def test_combined_step_matches_a_hand_computed_step(tiny_pipe):
    """One denoising step of the pipeline equals the formula applied to three separate UNet calls."""
    from dreamcache.core.adapter import use_memory
    from dreamcache.core.cache import collate_memory

    cache = tiny_pipe.cache_subject(product_image())
    names = [layer.name for layer in tiny_pipe.dreamcache_layers]
    got = tiny_pipe("a mug", subject=cache, seed=11, num_inference_steps=1, image_guidance_scale=0.4,
                    guidance_scale=5.0, output_type="latent", progress=False).images

    tiny_pipe.scheduler.set_timesteps(1)
    t = tiny_pipe.scheduler.timesteps[0]
    latents = tiny_pipe.prepare_latents(1, 4, 32, 32, torch.float32, "cpu", [torch.Generator().manual_seed(11)])
    text = tiny_pipe.encode_prompt("a mug", "cpu", 1, False)[0]
    empty = tiny_pipe.encode_prompt("", "cpu", 1, False)[0]
    with torch.no_grad():
        plain = tiny_pipe.unet(latents, t, encoder_hidden_states=empty).sample
        with use_memory(tiny_pipe.unet, collate_memory([cache], names, "cpu", torch.float32)):
            image = tiny_pipe.unet(latents, t, encoder_hidden_states=empty).sample
            full = tiny_pipe.unet(latents, t, encoder_hidden_states=text).sample
    eps = plain + 0.4 * (image - plain) + 5.0 * (full - image)
    expected = tiny_pipe.scheduler.step(eps, t, latents).prev_sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
