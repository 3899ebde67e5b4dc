from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from dreamcache.core.denoiser import FastPaths
from dreamcache.core.placement import LatentBlend, PlacedProduct, Placement, canvas_size
from dreamcache.core.schedulers import SAMPLERS, make_scheduler
from tests.helpers import product_image

SIZE = (64, 64)  # canvas of the pipeline tests: 32x32 latents on the tiny VAE


def textured_product(size=(60, 80), seed=0, box=(8, 10, 52, 70)) -> PlacedProduct:
    """A noisy photo (every pixel its own value) whose product is the rectangle `box`, rounded at its corners."""
    rng = np.random.default_rng(seed)
    photo = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    mask = np.zeros((size[1], size[0]), bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    mask[box[1], box[0]] = mask[box[3] - 1, box[2] - 1] = False
    return PlacedProduct.from_photo(photo, mask, Placement(scale=0.7))


def shoot(pipe, placed, **kwargs):
    kwargs = dict(seed=3, num_inference_steps=4, progress=False, width=SIZE[0], height=SIZE[1]) | kwargs
    return pipe("a mug on a table", placed=placed, **kwargs).images


def encoded(pipe, placed, size=SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z0 of the placed product's canvas, and the latent cells it touches (hold) and fills (core)."""
    image, mask = placed.canvas(size)
    z0 = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode() * pipe.vae.config.scaling_factor
    mask = torch.from_numpy(mask)[None, None]
    hold = torch.nn.functional.max_pool2d(mask, pipe.vae_scale_factor)[0, 0] > 0
    core = -torch.nn.functional.max_pool2d(-mask, pipe.vae_scale_factor)[0, 0] >= 1
    return z0.detach(), hold, core


# --- the canvas -----------------------------------------------------------------------------

@pytest.mark.parametrize("aspect, short, multiple, expected", [
    ((16, 9), 512, 64, (896, 512)),  # 910.2 rounds to 896
    ((9, 16), 512, 64, (512, 896)),
    ((4, 5), 512, 64, (512, 640)),
    ((1, 1), 512, 64, (512, 512)),
    ((3, 2), 768, 64, (1152, 768)),
    ((1, 1), 10, 64, (64, 64)),  # at least one multiple
    ((21, 9), 32, 8, (72, 32)),  # 74.7 rounds to 72
])
def test_canvas_size_keeps_the_short_side_and_rounds_the_long_one(aspect, short, multiple, expected):
    assert canvas_size(*aspect, short, multiple) == expected


def test_canvas_size_rejects_non_positive_inputs():
    with pytest.raises(ValueError, match="must all be positive"):
        canvas_size(16, 0, 512, 64)


@pytest.mark.parametrize("product", [(200, 50), (30, 300), (90, 90)])  # wide, tall, square cut-outs
@pytest.mark.parametrize("size", [(64, 64), (896, 512), (512, 640), (40, 200)])
def test_the_box_is_never_cropped_keeps_the_aspect_and_honours_the_centre(product, size):
    placed = PlacedProduct(Image.new("RGBA", product, (1, 2, 3, 255)))
    width, height = size
    for x in (0.0, 0.2, 0.5, 1.0):
        for y in (0.0, 0.55, 1.0):
            for scale in (0.1, 0.6, 1.0):
                placed = replace(placed, placement=Placement(x=x, y=y, scale=scale))
                left, top, right, bottom = placed.box(size)
                assert 0 <= left < right <= width and 0 <= top < bottom <= height, (x, y, scale)
                w, h = right - left, bottom - top
                fit = min(width / product[0], height / product[1]) * scale
                assert abs(w - product[0] * fit) <= 0.5 and abs(h - product[1] * fit) <= 0.5
                if scale == 1.0:  # contain-fit: one side fills the canvas
                    assert w == width or h == height
                if w / 2 <= x * width <= width - w / 2:
                    assert abs((left + right) / 2 - x * width) <= 1
                if h / 2 <= y * height <= height - h / 2:
                    assert abs((top + bottom) / 2 - y * height) <= 1


def test_placement_and_masks_are_checked():
    with pytest.raises(ValueError, match="scale 0 must lie in"):
        Placement(scale=0)
    with pytest.raises(ValueError, match="x 1.5 must lie between 0 and 1"):
        Placement(x=1.5)
    with pytest.raises(ValueError, match="free_steps -0.1"):
        Placement(free_steps=-0.1)
    with pytest.raises(ValueError, match="feather 0.6"):
        Placement(feather=0.6)
    photo = product_image()
    with pytest.raises(ValueError, match=r"mask of shape \(10, 10\) does not match the photo's \(H, W\) \(80, 96\)"):
        PlacedProduct.from_photo(photo, np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="mask is empty.*pass it as bool"):
        PlacedProduct.from_photo(photo, np.ones((80, 96), np.uint8))


def test_the_cutout_is_the_masked_photo_cropped_to_its_box():
    image = product_image((200, 30, 40), size=(96, 80))
    mask = (np.asarray(image) < 250).any(axis=2)
    placed = PlacedProduct.from_photo(image, Image.fromarray(mask.astype(np.uint8) * 255))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert placed.cutout.size == (cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
    rgba = np.asarray(placed.cutout)
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert np.array_equal(rgba[..., 3] == 255, crop)
    # outside the mask the colour is the product's nearest edge colour, never the photo's white
    assert (rgba[..., :3][~crop] == (200, 30, 40)).all()


def test_composite_pastes_the_photos_pixels_at_any_size():
    placed = textured_product(size=(240, 320), box=(32, 40, 208, 280))  # a photo larger than the shot
    placed = replace(placed, placement=replace(placed.placement, edge_band=0.0, shadow="none"))  # the paste alone
    shot = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for size in ((64, 64), (256, 256)):  # the generated size and the shop's, upscaled
        image = shot.resize(size, Image.Resampling.LANCZOS)
        out = np.asarray(placed.composite(image))
        rgb, alpha = placed.layer(size).rgb, placed.layer(size).alpha
        left, top, right, bottom = placed.box(size)
        expected = np.asarray(placed.cutout.convert("RGB").resize((right - left, bottom - top),
                                                                  Image.Resampling.LANCZOS))
        inside = alpha == 1
        assert inside.sum() > 0.5 * (right - left) * (bottom - top)
        assert np.array_equal(out[inside], rgb[inside])
        assert np.array_equal(out[top:bottom, left:right][inside[top:bottom, left:right]],
                              expected[inside[top:bottom, left:right]])
        assert np.array_equal(out[alpha == 0], np.asarray(image)[alpha == 0])
        edge = (alpha > 0) & (alpha < 1)
        assert edge.any(), "the feather band ramps"
    # at the shop's size the detail is the photo's, not the small shot's upscaled
    small = placed.composite(shot).resize((256, 256), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(small, float)[inside] - np.asarray(out, float)[inside]).mean() > 10



def test_a_shot_resized_to_another_aspect_gets_its_product_where_the_canvas_had_it():
    """A 16:9 canvas (896x512 on SD) is delivered at exactly 16:9 (1920x1080): the product is pasted at the canvas's
    box scaled with the scene, where the edge band and shadow were generated, not refitted to the new aspect."""
    placed = PlacedProduct.from_photo(*_photo_and_mask(), Placement(x=0.3, y=0.6, scale=0.8))
    canvas, delivered = (112, 64), (192, 108)
    left, top, right, bottom = placed.box(canvas)
    scaled = (left * 192 / 112, top * 108 / 64, right * 192 / 112, bottom * 108 / 64)
    assert all(abs(a - b) <= 1 for a, b in zip(placed.box(delivered, generated_at=canvas), scaled))
    assert any(abs(a - b) > 1 for a, b in zip(placed.box(delivered), scaled))  # refitted: somewhere else
    alpha = placed.layer(delivered, canvas).alpha
    rows, cols = np.flatnonzero((alpha > 0).any(axis=1)), np.flatnonzero((alpha > 0).any(axis=0))
    assert abs(cols[0] - scaled[0]) <= 1 and abs(rows[-1] + 1 - scaled[3]) <= 1
    image = Image.new("RGB", delivered, (0, 0, 0))
    assert np.array_equal(np.asarray(placed.composite(image, generated_at=canvas)),
                          np.asarray(placed.composite(image, generated_at=list(canvas))))


def _photo_and_mask():
    photo = Image.new("RGB", (90, 60), (200, 30, 40))
    mask = np.zeros((60, 90), bool)
    mask[5:55, 10:80] = True  # a wide product: its box fills the canvas's height at scale 0.8
    return photo, mask


# --- blending the latents -------------------------------------------------------------------

def test_held_cells_are_the_canvas_latent_noised_with_the_rows_own_noise():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    scheduler.set_timesteps(8)
    z0, noise, latents = torch.randn(3, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, 2:7, 2:7] = 1.0
    masks[0, :, 2, 2] = 0.5  # a partly covered pixel: its cell is held, but not core
    blend = LatentBlend.make(z0, masks, noise, [0.25, 0.25], scheduler)
    assert blend.hold[0, 0].sum() == 9 and blend.core[0, 0].sum() == 3 and not blend.hold[1].any()
    assert blend.free_from.flatten().tolist() == [6, 6]
    for i in (0, 5, 6, 7):
        out = blend(latents, i)
        cells = blend.hold if i < 6 else blend.core
        if i < 7:
            a = scheduler.alphas_cumprod[scheduler.timesteps[i + 1]]
            target = a.sqrt() * z0 + (1 - a).sqrt() * noise
        else:
            target = z0
        torch.testing.assert_close(out[0][:, cells[0, 0]], target[0][:, cells[0, 0]])
        assert torch.equal(out[0][:, ~cells[0, 0]], latents[0][:, ~cells[0, 0]])
        assert torch.equal(out[1], latents[1]), "a row without a product is left alone"


def test_the_noise_level_is_the_next_steps_even_where_a_schedule_repeats_a_timestep(tiny_pipe):
    scheduler = make_scheduler("dpm++2m-karras", tiny_pipe.scheduler)
    scheduler.set_timesteps(50)
    timesteps = scheduler.timesteps.tolist()
    assert len(set(timesteps)) < len(timesteps), "the case under test: Karras sigmas repeat a timestep at 50 steps"
    z0, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    blend = LatentBlend.make(z0, torch.ones(1, 1, 2, 2), noise, [0.0], scheduler)
    latents = torch.zeros(1, 1, 2, 2)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        latents = scheduler.step(torch.zeros_like(latents), t, latents).prev_sample
        sigma = scheduler.sigmas[i + 1]
        # add_noise(0, 1) is the noise level of step i + 1: sigma_t of the VP parametrisation
        torch.testing.assert_close(blend(latents, i), torch.full_like(latents, float(sigma / (sigma**2 + 1).sqrt())))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_products_core_ends_as_its_canvas_latent_with_every_sampler(tiny_pipe, sampler):
    cache = tiny_pipe.cache_subject(product_image())
    placed = textured_product()
    z0, hold, core = encoded(tiny_pipe, placed)
    latents = shoot(tiny_pipe, placed, subject=cache, guidance="combined", sampler=sampler, output_type="latent")
    assert torch.equal(latents[..., core], z0[..., core])
    band = hold & ~core
    assert (latents[..., band] != z0[..., band]).any(), "the edge band runs free over the last steps"
    assert (latents[..., ~hold] - z0[..., ~hold]).abs().mean() > 0.1, "the scene is generated"


def test_without_free_steps_every_touched_cell_is_held(tiny_pipe):
    placed = PlacedProduct(textured_product().cutout, Placement(scale=0.7, free_steps=0.0))
    z0, hold, _ = encoded(tiny_pipe, placed)
    latents = shoot(tiny_pipe, placed, sampler="unipc", output_type="latent")
    assert torch.equal(latents[..., hold], z0[..., hold])


def test_the_paste_puts_back_the_products_pixels_and_only_inside_its_mask(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    placed = textured_product()
    placed = replace(placed, placement=replace(placed.placement, edge_band=0.0, shadow="none"))  # the paste alone
    pasted = np.asarray(shoot(tiny_pipe, placed, subject=cache)[0])
    generated = np.asarray(shoot(tiny_pipe, placed, subject=cache, paste=False)[0])
    rgb, alpha = placed.layer(SIZE).rgb, placed.layer(SIZE).alpha
    canvas, mask = placed.canvas(SIZE)
    inside = alpha == 1
    assert inside.sum() > 100
    assert np.array_equal(pasted[inside], rgb[inside])
    assert np.array_equal(pasted[inside], np.asarray(canvas)[inside]), "the pixels the VAE encoded"
    assert (generated[inside] != rgb[inside]).any(), "the decoder alone does not give them back"
    assert np.array_equal(pasted[mask == 0], generated[mask == 0])
    # the same paste on the other output types
    as_np = shoot(tiny_pipe, placed, subject=cache, output_type="np")[0]
    np.testing.assert_array_equal(np.round(as_np[inside] * 255), rgb[inside])


def test_rows_with_and_without_a_product_share_a_batch(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    one, other = textured_product(seed=1), PlacedProduct(textured_product(seed=2).cutout, Placement(x=0.3, y=0.7))
    prompts, subjects, seeds, products = ["a", "b", "c"], [cache, None, cache], [4, 5, 6], [one, None, other]
    kwargs = dict(num_inference_steps=3, output_type="np", width=SIZE[0], height=SIZE[1], progress=False)
    together = np.stack(tiny_pipe(prompts, subject=subjects, seed=seeds, placed=products, batch_size=3,
                                  **kwargs).images)
    tiny_pipe.enable_fast_paths(FastPaths(static_batch=True))  # padded to 4 rows: the products column too
    padded = np.stack(tiny_pipe(prompts, subject=subjects, seed=seeds, placed=products, batch_size=4,
                                **kwargs).images)
    np.testing.assert_allclose(padded, together, atol=1e-4)
    for j in range(3):
        alone = tiny_pipe(prompts[j], subject=subjects[j], seed=seeds[j], placed=products[j], **kwargs).images
        np.testing.assert_allclose(together[j], alone[0], atol=1e-4)
    plain = tiny_pipe(prompts[1], seed=seeds[1], **kwargs).images
    np.testing.assert_allclose(together[1], plain[0], atol=1e-4)
    assert np.abs(together[0] - together[2]).max() > 0.1
    with pytest.raises(ValueError, match="3 prompts and 2 placed products"):
        tiny_pipe(prompts, placed=[one, None])


def test_a_product_placed_on_a_wide_canvas(tiny_pipe):
    placed = textured_product()
    size = (64, 40)
    z0, _, core = encoded(tiny_pipe, placed, size)
    latents = shoot(tiny_pipe, placed, width=size[0], height=size[1], output_type="latent")
    assert latents.shape[-2:] == (20, 32)
    assert torch.equal(latents[..., core], z0[..., core])
    image = shoot(tiny_pipe, placed, width=size[0], height=size[1])[0]
    rgb, alpha = placed.layer(size).rgb, placed.layer(size).alpha
    assert image.size == size and np.array_equal(np.asarray(image)[alpha == 1], rgb[alpha == 1])


# --- sitting in the scene: the edge band, the contact shadow, the cache near the product --------

def _square_product(placement: Placement) -> PlacedProduct:
    """A flat red square on white, placed on a 64x64 canvas."""
    photo = Image.new("RGB", (40, 40), (255, 255, 255))
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    photo.paste((200, 30, 40), (10, 10, 30, 30))
    return PlacedProduct.from_photo(photo, mask, placement)


def _scene_with_halo(layer) -> np.ndarray:
    """A two-tone scene (sky above, ground below) with a magenta ring drawn around the product: a decoder's halo."""
    scene = np.zeros((64, 64, 3), np.uint8)
    scene[:32], scene[32:] = (120, 180, 235), (225, 200, 140)
    near = (layer.band > 0) & (layer.alpha == 0)
    scene[near] = (255, 0, 255)
    return scene


def test_the_edge_band_takes_the_scenes_colour_from_beyond_it():
    placed = _square_product(Placement(shadow="none", edge_band=0.1))
    layer = placed.layer((64, 64))
    scene = _scene_with_halo(layer)
    out = np.asarray(placed.composite(Image.fromarray(scene))).astype(int)
    full = layer.band == 1
    assert (full & (layer.alpha == 0)).sum() > 50
    # where the band is whole, every magenta pixel became the sky's or the ground's colour
    sky, ground = np.array((120, 180, 235)), np.array((225, 200, 140))
    colours = out[full & (layer.alpha == 0)]
    nearest = np.minimum(np.abs(colours - sky).max(-1), np.abs(colours - ground).max(-1))
    assert nearest.max() == 0
    # beyond the band the scene is untouched; without a band the halo stays
    assert np.array_equal(out[layer.band == 0], scene[layer.band == 0])
    plain = _square_product(Placement(shadow="none", edge_band=0.0))
    assert (np.asarray(plain.composite(Image.fromarray(scene)))[full & (layer.alpha == 0)] == (255, 0, 255)).all()


def test_the_soft_shadow_darkens_the_ground_under_the_product_only():
    soft, none = (_square_product(Placement(edge_band=0.0, shadow=shadow)) for shadow in ("soft", "none"))
    grey = Image.new("RGB", (64, 64), (200, 200, 200))
    shaded, plain = (np.asarray(p.composite(grey)).astype(int) for p in (soft, none))
    left, top, right, bottom = soft.box((64, 64))
    below = shaded[bottom:bottom + 2, left + 2:right - 2]
    assert (below < 200).all() and below.min() <= 200 * (1 - 0.45 * 0.6)  # darkest just under the product
    assert (shaded[:top] == 200).all() and (shaded[:, : left - 3] == 200).all()  # not above it nor far beside it
    alpha = soft.layer((64, 64)).alpha
    assert np.array_equal(shaded[alpha == 1], plain[alpha == 1])  # the product's pixels as they were
    assert (plain[alpha == 0] == 200).all()  # none: no shadow
    with pytest.raises(ValueError, match="shadow 'hard': choose one of none, soft"):
        Placement(shadow="hard")


def test_the_shadow_sits_under_what_the_product_stands_on():
    """A lamp-like shape (wide shade, thin stem, narrow base): the shadow is as wide as the base, not the shade."""
    photo = Image.new("RGB", (40, 40), (255, 255, 255))
    mask = np.zeros((40, 40), bool)
    mask[0:15, 0:40] = True  # the shade
    mask[15:35, 18:22] = True  # the stem
    mask[35:40, 14:26] = True  # the base, 12 px of 40
    placed = PlacedProduct.from_photo(photo, mask, Placement(x=0.5, y=0.4, scale=0.5, edge_band=0.0))
    shade = placed.layer((64, 64)).shade
    left, _, right, bottom = placed.box((64, 64))
    dark = np.flatnonzero(shade[bottom - 1] < 0.95)
    assert 0 < len(dark) < 0.5 * (right - left)  # the base's width and a little more, not the shade's
    assert abs(dark.mean() - (left + right - 1) / 2) <= 1  # centred under the base


def test_the_cache_acts_near_the_product_only():
    placed = _square_product(Placement(cache_band=0.1))
    region = placed.region((64, 64))
    _, mask = placed.canvas((64, 64))
    assert (region[mask > 0] == 1).all()
    assert region[0, 0] == 0 and region[-1, -1] == 0  # far corners: text guidance alone
    assert ((region > 0) & (region < 1)).any()  # a ramp, not a seam
    assert _square_product(Placement(cache_band=None)).region((64, 64)) is None


def test_a_limited_cache_leaves_the_product_and_changes_only_the_scene_far_away(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    base = textured_product()
    near, everywhere = (replace(base, placement=replace(base.placement, cache_band=band, edge_band=0.0, shadow="none"))
                        for band in (0.05, None))
    kwargs = dict(subject=cache, image_guidance_scale=5.0, output_type="latent")
    limited, full = shoot(tiny_pipe, near, **kwargs), shoot(tiny_pipe, everywhere, **kwargs)
    z0, _, core = encoded(tiny_pipe, near)
    assert torch.equal(limited[..., core], z0[..., core])  # the product is held either way
    far = torch.from_numpy(near.region(SIZE) == 0)[None, None].float()
    far = torch.nn.functional.avg_pool2d(far, tiny_pipe.vae_scale_factor)[0, 0] == 1
    assert far.any() and (limited - full)[..., far].abs().max() > 1e-3
    # without a cache there is no image term to limit: the region changes nothing
    assert torch.equal(shoot(tiny_pipe, near, output_type="latent"), shoot(tiny_pipe, everywhere, output_type="latent"))
