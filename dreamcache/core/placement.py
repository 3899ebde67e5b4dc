"""Placement: the product kept pixel-exact where the shop puts it, the scene generated around it.

Blended latent diffusion with the base UNet (no inpainting model), as diffusers'
`StableDiffusionInpaintPipeline` does for a 4-channel UNet:

1. The segmented product is put on a neutral canvas at its box (`PlacedProduct.box`); the VAE encodes
   that canvas to z0 (posterior mode).
2. After each denoising step, the latent cells the product touches (`hold`) are replaced by z0 noised
   to the next step's level with the row's own initial noise; after the last step, by z0 itself.
3. Over the last `free_steps` of the steps only the cells wholly inside the product (`core`) are
   replaced: the band at its edge runs free, so the edge blends into the scene.
4. After decoding (`composite`), a thin band outside the product (`edge_band`) takes the colour of the scene
   just beyond it: the decoder smears the product's held colours and the neutral canvas into that band (a
   halo), and the scene beyond it is the model's own. A soft contact shadow (`shadow`) darkens the ground
   under the product. Then the product's own pixels are pasted back inside its mask, ramped over `feather`
   at its very edge: the decoder mixes every latent into every pixel, so the product's pixels come back
   from the photo, not from the latents.

The subject cache's image guidance acts only within `cache_band` of the product (`region`); elsewhere the
scene gets text guidance alone. With the cache everywhere, the model draws the product a second time beside
the placed one (bench/placement_quality.py measures how often). Rows without a product sample as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from PIL import Image
from scipy import ndimage

# The canvas around the product before the scene is generated: mid grey, 0 in the VAE's [-1, 1].
NEUTRAL = (128, 128, 128)
SHADOWS = ("none", "soft")
# The soft shadow: how dark at its centre (the ground keeps 1 - this of its light), and its ellipse's half
# height as a share of its half width (a low sun-less studio light: wide and flat).
SHADOW_DEPTH = 0.45
SHADOW_FLATNESS = 0.22


def canvas_size(aspect_w: float, aspect_h: float, short_side: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the canvas for an aspect ratio: `short_side` (the model's native resolution)
    on the short side, each side rounded to the nearest multiple of `multiple` (at least one multiple)."""
    if aspect_w <= 0 or aspect_h <= 0 or short_side <= 0 or multiple <= 0:
        raise ValueError(f"aspect {aspect_w}:{aspect_h}, short side {short_side} and multiple {multiple} "
                         "must all be positive")

    def snap(side: float) -> int:
        return max(multiple, math.floor(side / multiple + 0.5) * multiple)

    if aspect_w >= aspect_h:
        return snap(short_side * aspect_w / aspect_h), snap(short_side)
    return snap(short_side), snap(short_side * aspect_h / aspect_w)


@dataclass(frozen=True)
class Placement:
    """Where the product goes and how it blends in."""

    x: float = 0.5  # centre of the product's box, as a fraction of the canvas width
    y: float = 0.55  # ... of its height: a little low, so the product stands on something
    scale: float = 0.6  # the box contain-fitted to the canvas, times this: never cropped
    free_steps: float = 0.25  # fraction of the last steps in which only the core is held and the edge runs free
    feather: float = 0.02  # width of the pasted edge's ramp, as a fraction of the canvas's shorter side
    # Outside the product, as fractions of the shorter side: the band whose pixels take the scene's colour from
    # just beyond it (0: the decoded pixels as they are), and how far from the product the cache's image
    # guidance acts (None: everywhere, the model then often draws a second product beside the placed one).
    edge_band: float = 0.03
    cache_band: float | None = 0.1
    shadow: Literal["none", "soft"] = "soft"  # a contact shadow under the product, composited

    def __post_init__(self):
        for name in ("x", "y", "free_steps"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"placement {name} {getattr(self, name)} must lie between 0 and 1")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"placement scale {self.scale} must lie in (0, 1]: 1 fits the product to the canvas")
        if not 0.0 <= self.feather < 0.5:
            raise ValueError(f"placement feather {self.feather} must lie in [0, 0.5) (a fraction of the shorter side)")
        for name in ("edge_band", "cache_band"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"placement {name} {value} must lie in [0, 1] (a fraction of the shorter side)")
        if self.edge_band is None:
            raise ValueError("placement edge_band must be a number: 0 leaves the decoded edge as it is")
        if self.shadow not in SHADOWS:
            raise ValueError(f"placement shadow {self.shadow!r}: choose one of {', '.join(SHADOWS)}")


@dataclass(frozen=True, eq=False)
class PlacedProduct:
    """The product cut out of its photo, and where it goes on a canvas.

    `cutout` is RGBA at the photo's own resolution, cropped to the mask's bounding box, alpha the mask.
    Outside the mask its RGB carries the product's nearest edge colour, so resampling never bleeds the
    photo's background into the product's edge.
    """

    cutout: Image.Image
    placement: Placement = Placement()

    @classmethod
    def from_photo(cls, photo: Image.Image, mask: Image.Image | np.ndarray,
                   placement: Placement = Placement()) -> "PlacedProduct":
        """`mask`: (H, W) bool, or 0-255 (uint8 array or L image) with the product at 128 and above."""
        rgb = np.asarray(photo.convert("RGB"))
        if isinstance(mask, Image.Image):
            mask = np.asarray(mask.convert("L"))
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask of shape {mask.shape} does not match the photo's (H, W) {rgb.shape[:2]}")
        inside = mask if mask.dtype == bool else mask >= 128
        if not inside.any():
            raise ValueError("the product's mask is empty: numbers count as product from 128 (for a 0/1 or 0-1 "
                             "mask, pass it as bool)")
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        crop = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        rgb, inside = rgb[crop], inside[crop]
        nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
        rgb = rgb[nearest[0], nearest[1]]  # (h, w, 3): each pixel outside the mask takes its nearest product pixel
        rgba = np.dstack([rgb, np.where(inside, 255, 0).astype(np.uint8)])
        return cls(Image.fromarray(rgba, "RGBA"), placement)

    def box(self, size: tuple[int, int], generated_at: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the product on a canvas of `size` (width, height): contain-fitted
        times `scale`, centred at (x, y), moved as little as needed to lie wholly inside.

        `generated_at`: the canvas an image of `size` was resized from (a shot delivered at a shop's exact
        aspect, a little off the canvas's): the canvas's box scaled with the image, so the product lands
        where the scene was generated around it."""
        if generated_at is not None and tuple(generated_at) != tuple(size):
            sx, sy = size[0] / generated_at[0], size[1] / generated_at[1]
            left, top, right, bottom = self.box(generated_at)
            return round(left * sx), round(top * sy), max(round(right * sx), round(left * sx) + 1), \
                max(round(bottom * sy), round(top * sy) + 1)
        width, height = size
        fit = min(width / self.cutout.width, height / self.cutout.height) * self.placement.scale
        w = min(width, max(1, round(self.cutout.width * fit)))
        h = min(height, max(1, round(self.cutout.height * fit)))
        left = min(max(round(self.placement.x * width - w / 2), 0), width - w)
        top = min(max(round(self.placement.y * height - h / 2), 0), height - h)
        return left, top, left + w, top + h

    # The product is resampled once per size: a run places one product in batch after batch (kept per
    # product, read-only for callers).
    @lru_cache(maxsize=8)
    def canvas(self, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
        """The product on a neutral canvas of `size` (what the VAE encodes), and its mask there, (H, W)
        float in [0, 1] (fractional on the edge pixels)."""
        pixels, coverage, (left, top, right, bottom) = self._resampled(size)
        image = Image.new("RGB", size, NEUTRAL)
        image.paste(pixels, (left, top), coverage)
        mask = np.zeros((size[1], size[0]), np.float32)
        mask[top:bottom, left:right] = np.asarray(coverage, np.float32) / 255
        return image, mask

    @lru_cache(maxsize=8)
    def layer(self, size: tuple[int, int], generated_at: tuple[int, int] | None = None) -> "Layer":
        """What `composite` puts on a scene of `size`: the edge band, the shadow and the product's pixels."""
        pixels, coverage, (left, top, right, bottom) = self._resampled(size, generated_at)
        width, height = size
        inside = np.zeros((height, width), bool)
        inside[top:bottom, left:right] = np.asarray(coverage) >= 128
        # Alpha: 1 inside the mask eroded by the feather band, ramping to 0 at its edge (the box's edge is an edge).
        depth = ndimage.distance_transform_edt(np.pad(inside[top:bottom, left:right], 1))[1:-1, 1:-1]
        feather = self.placement.feather * min(size)
        alpha = np.zeros((height, width), np.float32)
        alpha[top:bottom, left:right] = np.clip(depth / feather, 0, 1) if feather > 0 else depth > 0
        rgb = np.zeros((height, width, 3), np.uint8)
        rgb[top:bottom, left:right] = np.asarray(pixels)
        band, source = edge_band(inside, self.placement.edge_band * min(size))
        shade = contact_shadow(inside) if self.placement.shadow == "soft" else np.ones((height, width), np.float32)
        return Layer(rgb, alpha, band, source, shade)

    @lru_cache(maxsize=8)
    def region(self, size: tuple[int, int]) -> np.ndarray | None:
        """Where the cache's image guidance acts on a canvas of `size`, (H, W) float32: 1 on the product and within
        `cache_band` of it, ramping to 0 over another `cache_band`; None where it acts everywhere."""
        reach = self.placement.cache_band
        if reach is None:
            return None
        _, mask = self.canvas(size)
        distance = ndimage.distance_transform_edt(mask <= 0)  # pixels to the nearest product pixel
        reach = max(reach * min(size), 1.0)
        return np.clip(2 - distance / reach, 0, 1).astype(np.float32)

    def composite(self, image: Image.Image, generated_at: tuple[int, int] | None = None) -> Image.Image:
        """`image` with the product's pixels pasted at its box, resampled from the photo at `image`'s size
        (a shot upscaled to the shop's size gets the photo's detail at that size); `generated_at` as in `box`.
        The edge band and the shadow are put on the scene first (`Layer`)."""
        layer = self.layer(tuple(image.size), None if generated_at is None else tuple(generated_at))
        scene = np.asarray(image.convert("RGB"), np.float64).transpose(2, 0, 1) / 255  # (3, H, W) in [0, 1]
        mixed = layer.apply(scene, layer.rgb.transpose(2, 0, 1) / 255, layer.alpha, layer.band, layer.shade)
        return Image.fromarray(np.round(mixed.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")

    def _resampled(self, size, generated_at=None):
        box = self.box(size, generated_at)
        w, h = box[2] - box[0], box[3] - box[1]
        pixels = self.cutout.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
        coverage = self.cutout.getchannel("A").resize((w, h), Image.Resampling.BILINEAR)  # no ringing
        return pixels, coverage, box


@dataclass(frozen=True, eq=False)
class Layer:
    """What a placed product puts on a decoded scene of one size, in this order (`apply`):

    1. the edge band: each pixel moved `band` of the way to the scene's colour at `source`, its nearest
       pixel beyond the band (the decoder's halo replaced by the scene the model drew around it);
    2. the contact shadow: the scene's light times `shade`;
    3. the product's pixels, `rgb` over the result with `alpha`.
    """

    rgb: np.ndarray  # (H, W, 3) uint8: the product's pixels, resampled from the photo
    alpha: np.ndarray  # (H, W) float32: 1 inside the mask eroded by the feather band, ramping to 0 at its edge
    band: np.ndarray  # (H, W) float32 in [0, 1]: how far each pixel moves to its `source` colour
    source: np.ndarray  # (2, H, W) int: the (row, column) of each pixel's nearest scene pixel beyond the band
    shade: np.ndarray  # (H, W) float32 in (0, 1]: what the shadow leaves of the scene's light

    def apply(self, scene, rgb, alpha, band, shade):
        """The composite of a (3, H, W) scene in [0, 1] (numpy or torch alike); `rgb` (3, H, W) in [0, 1], `alpha`,
        `band`, `shade` (H, W): this layer's, as the caller's array type."""
        source = self.source if isinstance(scene, np.ndarray) else torch.from_numpy(self.source).to(scene.device)
        scene = scene * (1 - band) + scene[:, source[0], source[1]] * band
        return scene * shade * (1 - alpha) + rgb * alpha


def edge_band(inside: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """The band outside a product's mask `inside` (H, W) bool that takes the scene's colour from beyond it:
    (band (H, W) float32, 1 up to `width` / 2 from the product and ramping to 0 at `width`; source (2, H, W), each
    pixel's nearest pixel farther than `width` from the product)."""
    outside = ndimage.distance_transform_edt(~inside)  # pixels to the nearest product pixel (0 on it)
    beyond = outside > width
    if width <= 0 or not beyond.any():
        return np.zeros(inside.shape, np.float32), np.indices(inside.shape)
    _, source = ndimage.distance_transform_edt(~beyond, return_indices=True)
    band = np.clip(2 - 2 * outside / width, 0, 1).astype(np.float32)
    return band, source


def contact_shadow(inside: np.ndarray, depth: float = SHADOW_DEPTH, flatness: float = SHADOW_FLATNESS) -> np.ndarray:
    """What a soft contact shadow leaves of the light, (H, W) float32: an ellipse centred on the product's lowest
    row, as wide as what the product stands on (its bottom tenth) and a little more, darkest (1 - depth) at its
    centre and fading smoothly to 1 at its rim. The product is pasted over its upper half."""
    rows = np.flatnonzero(inside.any(axis=1))
    bottom = rows[-1]
    foot = inside[max(rows[0], bottom - max(1, round(0.1 * (bottom - rows[0] + 1)))) : bottom + 1].any(axis=0)
    cols = np.flatnonzero(foot)
    half_width = max(1.0, 0.6 * (cols[-1] - cols[0] + 1))
    half_height = max(1.0, flatness * half_width)
    y, x = np.indices(inside.shape, dtype=np.float32)
    r2 = ((x - (cols[0] + cols[-1]) / 2) / half_width) ** 2 + ((y - bottom) / half_height) ** 2
    return (1 - depth * np.clip(1 - r2, 0, 1) ** 2).astype(np.float32)


def paste(images: torch.Tensor, placed: list[PlacedProduct | None]) -> torch.Tensor:
    """Decoded images (n, 3, H, W) in [-1, 1] with each row's product put on (`PlacedProduct.layer`)."""
    size = (images.shape[-1], images.shape[-2])
    out = images.clone()
    for j, product in enumerate(placed):
        if product is None:
            continue
        layer = product.layer(size)

        def tensor(array):
            return torch.from_numpy(array).to(images.device)

        rgb = tensor(layer.rgb).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
        scene = (images[j].float() + 1) / 2
        mixed = layer.apply(scene, rgb, tensor(layer.alpha), tensor(layer.band), tensor(layer.shade))
        out[j] = (mixed * 2 - 1).to(images.dtype)
    return out


@dataclass
class LatentBlend:
    """The product's latent cells replaced after each step, for one batch (rows without a product hold none)."""

    z0: torch.Tensor  # (n, C, h, w): the canvases' latents
    noise: torch.Tensor  # (n, C, h, w): each row's initial noise, re-used to noise z0
    hold: torch.Tensor  # (n, 1, h, w) bool: cells with any product pixel
    core: torch.Tensor  # (n, 1, h, w) bool: cells with only product pixels
    free_from: torch.Tensor  # (n, 1, 1, 1): the step from which a row holds only its core
    scheduler: SchedulerMixin  # the batch's, its timesteps set

    @classmethod
    def make(cls, z0: torch.Tensor, masks: torch.Tensor, noise: torch.Tensor, free_steps: list[float],
             scheduler: SchedulerMixin) -> "LatentBlend":
        """z0, noise: (n, C, h, w); masks: (n, 1, H, W) pixel masks in [0, 1] (zero for rows without a
        product); free_steps per row. Call after `scheduler.set_timesteps`."""
        factor = masks.shape[-1] // z0.shape[-1]  # the VAE's downsampling
        hold = F.max_pool2d(masks, factor) > 0
        core = -F.max_pool2d(-masks, factor) >= 1
        steps = len(scheduler.timesteps)
        held = [steps - round(f * steps) for f in free_steps]
        free_from = torch.tensor(held, device=z0.device).view(-1, 1, 1, 1)
        if hasattr(scheduler, "set_begin_index"):
            # add_noise then takes the next step's noise level by index: a schedule may repeat a timestep
            # (Karras sigmas at 50 steps do), and looked up by value the level would be another step's.
            scheduler.set_begin_index(0)
        return cls(z0, noise, hold, core, free_from, scheduler)

    def __call__(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        """The latents after step i, the product's cells replaced by z0 at the next step's noise level."""
        timesteps = self.scheduler.timesteps
        if i + 1 < len(timesteps):
            target = self.scheduler.add_noise(self.z0, self.noise, timesteps[i + 1 : i + 2])
        else:
            target = self.z0
        cells = torch.where(i < self.free_from, self.hold, self.core)
        return torch.where(cells, target.to(latents.dtype), latents)
