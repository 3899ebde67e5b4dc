"""The authors' released inference, reproduced: a converted authors'-format checkpoint sampled with
`AUTHORS_INFERENCE` follows their sampling loop step by step.

The loop below is written from the authors' scripts (latent-diffusion's DDIM sampler, eta 0, with their
three evaluations and combination), independently of the pipeline: its own timesteps and alphas, its own
update, the UNet called once per pass with the cache attached or not. The reference is prepared their
way (stretched bilinear, the VAE posterior sampled) and cached with their negative prompt at t = 1.
Same tiny model, same noise: the pipeline must land on the same latents.
"""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler
from PIL import Image

from dreamcache.core.adapter import use_memory
from dreamcache.core.cache import collate_memory, extract_features
from dreamcache.core.weights import (
    AUTHORS_INFERENCE, AUTHORS_NEGATIVE_PROMPT, adapter_state_dict, convert_original_checkpoint, read_adapter_config,
)
from tests.helpers import make_tiny_pipeline, product_image

STEPS = 50
SEED = 7


def authors_checkpoint(pipe, path):
    """Random adapters for the tiny UNet's default layers, saved under latent-diffusion's key names."""
    torch.manual_seed(3)
    pipe.load_dreamcache(preset="default")
    per_level = pipe.unet.config.layers_per_block + 1
    state = {}
    for key, tensor in adapter_state_dict(pipe.dreamcache_adapters).items():
        layer, _, rest = key.partition(".attentions.")
        index, _, name = rest.partition(".")
        block = "middle_block.1" if layer == "mid_block" else \
            f"output_blocks.{int(layer.split('.')[1]) * per_level + int(index)}.1"
        name = name.replace("norm_mem.", "norm2_mem.")
        state[f"model.diffusion_model.{block}.transformer_blocks.0.{name}"] = torch.randn_like(tensor) * 0.2
    torch.save(state, path)
    pipe.unload_dreamcache()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny pipeline on the hub SD 2.1 base's scheduler (PNDM), with a converted authors' checkpoint."""
    root = tmp_path_factory.mktemp("authors")
    pipe = make_tiny_pipeline()
    pipe.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    authors_checkpoint(pipe, root / "cross_attention-200000.pt")
    config = convert_original_checkpoint(root / "cross_attention-200000.pt", root / "adapter", unet=pipe.unet)
    pipe.load_dreamcache(root / "adapter")
    return pipe, config, root


def test_a_converted_checkpoint_recommends_the_authors_inference(converted):
    _, config, root = converted
    assert config.recommended == AUTHORS_INFERENCE == read_adapter_config(root / "adapter").recommended
    assert (AUTHORS_INFERENCE.sampler, AUTHORS_INFERENCE.steps, AUTHORS_INFERENCE.eta) == ("ddim", 50, 0.0)
    assert (AUTHORS_INFERENCE.text_scale, AUTHORS_INFERENCE.image_scale) == (7.5, 0.35)
    assert AUTHORS_INFERENCE.negative_prompt == AUTHORS_NEGATIVE_PROMPT
    assert (AUTHORS_INFERENCE.reference_mode, AUTHORS_INFERENCE.latent) == ("stretch", "sample")


def authors_cache(pipe, image: Image.Image, seed: int):
    """Their reference path: stretched to the square (bilinear), posterior sampled, noised to t = 1, the
    UNet run with their negative prompt; one generator for both draws, as the pipeline documents."""
    size = pipe.resolution
    pixels = torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))).float()
    pixels = (pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
    posterior = pipe.vae.encode(pixels).latent_dist
    generator = torch.Generator().manual_seed(seed)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    negative = pipe.encode_prompt(AUTHORS_NEGATIVE_PROMPT, "cpu", 1, False)[0]
    return extract_features(pipe.unet, z * pipe.vae.config.scaling_factor, negative, pipe.dreamcache_layers,
                            DDPMScheduler.from_config(pipe.scheduler.config), timestep=1, generators=[generator])


def authors_sample(pipe, prompt: str, features, x_T: torch.Tensor) -> list[torch.Tensor]:
    """latent-diffusion's DDIM loop with the authors' three evaluations; every step's latents."""
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.double()
    ddim_timesteps = np.asarray(list(range(0, 1000, 1000 // STEPS))) + 1  # 1, 21, ..., 981
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    text = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    negative = pipe.encode_prompt(AUTHORS_NEGATIVE_PROMPT, "cpu", 1, False)[0]
    memory = collate_memory([_Cache(features)], [layer.name for layer in pipe.dreamcache_layers], "cpu", torch.float32)
    s_img, s_txt = AUTHORS_INFERENCE.image_scale, AUTHORS_INFERENCE.text_scale
    x, trajectory = x_T.double(), []
    for i, step in enumerate(np.flip(ddim_timesteps)):
        index = STEPS - i - 1
        t = torch.tensor([int(step)])
        with use_memory(pipe.unet, None):
            e_uncond = pipe.unet(x.float(), t, encoder_hidden_states=negative).sample.double()
        with use_memory(pipe.unet, memory):
            e_img = pipe.unet(x.float(), t, encoder_hidden_states=negative).sample.double()
            e_full = pipe.unet(x.float(), t, encoder_hidden_states=text).sample.double()
        e_t = e_uncond + s_img * (e_img - e_uncond) + s_txt * (e_full - e_img)
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t  # eta 0: sigma_t = 0
        trajectory.append(x.float())
    return trajectory


class _Cache:
    """What `collate_memory` reads of a FeatureCache: its tensors."""

    def __init__(self, features):
        self.tensors = {name: t[0] for name, t in features.items()}


@torch.no_grad()
def test_the_pipeline_follows_the_authors_sampling_loop_step_by_step(converted):
    pipe, _, _ = converted
    reference = product_image(size=(96, 64))  # not square: stretching and letterboxing differ
    ours = pipe.cache_subject(reference, seed=SEED, **AUTHORS_INFERENCE.caching())
    theirs = authors_cache(pipe, reference, SEED)
    assert ours.metadata.text == AUTHORS_NEGATIVE_PROMPT and ours.metadata.reference_mode == "stretch"
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours.tensors[name], tensor[0], atol=1e-5, rtol=1e-5)
    letterboxed = pipe.cache_subject(reference, seed=SEED, reference_mode="letterbox", latent="mode", text="")
    assert not torch.allclose(letterboxed.tensors[name], tensor[0], atol=1e-3)  # the preprocessing matters
    # Left unset, the preparation is the converted checkpoint's recommendation: the authors' own.
    assert pipe.cache_subject(reference, seed=SEED).metadata == ours.metadata

    prompt = "a mug on a beach"
    shape = (1, pipe.unet.config.in_channels, pipe.resolution // pipe.vae_scale_factor, pipe.resolution // pipe.vae_scale_factor)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    expected = authors_sample(pipe, prompt, theirs, x_T)

    # Every step of the pipeline's run, recorded as its DDIM scheduler returns it.
    from diffusers import DDIMScheduler

    seen, real = [], DDIMScheduler.step

    def spy(self, model_output, timestep, sample, *args, **kwargs):
        result = real(self, model_output, timestep, sample, *args, **kwargs)
        seen.append((int(timestep), result.prev_sample.clone()))
        return result

    DDIMScheduler.step = spy
    try:
        latents = pipe(prompt, subject=ours, seed=SEED, guidance="combined", output_type="latent", progress=False,
                       **AUTHORS_INFERENCE.sampling()).images
    finally:
        DDIMScheduler.step = real
    assert [t for t, _ in seen] == list(np.flip(np.arange(0, 1000, 20) + 1))
    for k, (_, step_latents) in enumerate(seen):
        torch.testing.assert_close(step_latents, expected[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"step {k}: {m}")
    torch.testing.assert_close(latents, expected[-1], atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_the_negative_prompt_is_what_the_unconditional_passes_see(converted):
    pipe, _, _ = converted
    subject = pipe.cache_subject(product_image(), seed=0)
    run = lambda **kw: pipe("a mug", subject=subject, seed=1, num_inference_steps=3, output_type="latent",
                            progress=False, sampler="ddim", **kw).images
    # Unset, it is the converted checkpoint's recommendation (the authors' text); "" is the empty prompt.
    assert torch.equal(run(), run(negative_prompt=AUTHORS_NEGATIVE_PROMPT))
    assert not torch.allclose(run(negative_prompt=""), run(negative_prompt="blurred"))
    # per row: the second row's negative prompt changes only the second image
    both = pipe(["a mug", "a mug"], subject=subject, seed=[1, 1], num_inference_steps=3, output_type="latent",
                progress=False, sampler="ddim", negative_prompt=["", "blurred"]).images
    torch.testing.assert_close(both[0], run(negative_prompt="")[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], run(negative_prompt="blurred")[0], atol=5e-5, rtol=1e-4)
