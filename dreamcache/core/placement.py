"""Placement: the product kept pixel-exact where the shop puts it, the scene generated around it.

Blended latent diffusion with the base UNet (no inpainting model), as diffusers'
`StableDiffusionInpaintPipeline` does for a 4-channel UNet:

1. The segmented product is put on a neutral canvas at its box (`PlacedProduct.box`); the VAE encodes
   that canvas to z0 (posterior mode).
2. After each denoising step, the latent cells the product touches (`hold`) are replaced by z0 noised
   to the next step's level with the row's own initial noise; after the last step, by z0 itself.
3. Over the last `free_steps` of the steps only the cells wholly inside the product (`core`) are
   replaced: the band at its edge runs free, so the edge and the contact shadow blend into the scene.
4. After decoding, the product's own pixels are pasted back inside its mask, ramped over `feather` at
   its very edge (`composite`): the decoder mixes every latent into every pixel, so the product's
   pixels come back from the photo, not from the latents.

The subject cache conditions the whole image as without placement; rows without a product sample as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from PIL import Image
from scipy import ndimage

# The canvas around the product before the scene is generated: mid grey, 0 in the VAE's [-1, 1].
NEUTRAL = (128, 128, 128)


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

    def __post_init__(self):
        for name in ("x", "y", "free_steps"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"placement {name} {getattr(self, name)} must lie between 0 and 1")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"placement scale {self.scale} must lie in (0, 1]: 1 fits the product to the canvas")
        if not 0.0 <= self.feather < 0.5:
            raise ValueError(f"placement feather {self.feather} must lie in [0, 0.5) (a fraction of the shorter side)")


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
    def layer(self, size: tuple[int, int],
              generated_at: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """What `composite` pastes on a canvas of `size`: the product's pixels (H, W, 3) uint8 and their
        alpha (H, W) float32, 1 inside the mask eroded by the feather band, ramping to 0 at its edge."""
        pixels, coverage, (left, top, right, bottom) = self._resampled(size, generated_at)
        inside = np.pad(np.asarray(coverage) >= 128, 1)  # a border of outside: the box's edge is an edge
        depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]  # pixels to the nearest outside one
        band = self.placement.feather * min(size)
        alpha = np.zeros((size[1], size[0]), np.float32)
        alpha[top:bottom, left:right] = np.clip(depth / band, 0, 1) if band > 0 else depth > 0
        rgb = np.zeros((size[1], size[0], 3), np.uint8)
        rgb[top:bottom, left:right] = np.asarray(pixels)
        return rgb, alpha

    def composite(self, image: Image.Image, generated_at: tuple[int, int] | None = None) -> Image.Image:
        """`image` with the product's pixels pasted at its box, resampled from the photo at `image`'s size
        (a shot upscaled to the shop's size gets the photo's detail at that size); `generated_at` as in `box`."""
        rgb, alpha = self.layer(tuple(image.size), None if generated_at is None else tuple(generated_at))
        alpha = alpha[..., None].astype(np.float64)
        mixed = np.asarray(image.convert("RGB"), np.float64) * (1 - alpha) + rgb * alpha
        return Image.fromarray(np.round(mixed).astype(np.uint8), "RGB")

    def _resampled(self, size, generated_at=None):
        box = self.box(size, generated_at)
        w, h = box[2] - box[0], box[3] - box[1]
        pixels = self.cutout.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
        coverage = self.cutout.getchannel("A").resize((w, h), Image.Resampling.BILINEAR)  # no ringing
        return pixels, coverage, box


def paste(images: torch.Tensor, placed: list[PlacedProduct | None]) -> torch.Tensor:
    """Decoded images (n, 3, H, W) in [-1, 1] with each row's product pasted back (`PlacedProduct.layer`)."""
    size = (images.shape[-1], images.shape[-2])
    out = images.clone()
    for j, product in enumerate(placed):
        if product is None:
            continue
        rgb, alpha = product.layer(size)
        rgb = torch.from_numpy(rgb).to(images.device).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
        alpha = torch.from_numpy(alpha).to(images.device)  # (H, W)
        out[j] = (images[j].float() * (1 - alpha) + rgb * alpha).to(images.dtype)
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
