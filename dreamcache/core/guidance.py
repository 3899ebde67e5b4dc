"""How the noise predictions of one step are combined (method note, section 4).

combined (the released sampler, three UNet evaluations a step):
    eps = eps(no cache, empty) + s_img * (eps(cache, empty) - eps(no cache, empty))
                               + s_txt * (eps(cache, text)  - eps(cache, empty))
joint (the paper's supplement, two evaluations):
    eps = eps(no cache, empty) + s * (eps(cache, text) - eps(no cache, empty))

A higher image scale keeps more of the reference; a lower one lets the prompt edit more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: the modes and bounds are read where torch is not loaded (the CLI's options)
    import torch

# The modes, spelled here once: everything else (pipeline, run parameters, CLIs, evaluations) names them
# through these constants.
Guidance = Literal["combined", "joint"]
COMBINED: Guidance = "combined"
JOINT: Guidance = "joint"
GUIDANCE_MODES: tuple[Guidance, ...] = (COMBINED, JOINT)
DEFAULT_GUIDANCE: Guidance = COMBINED  # the authors' released sampler

# UNet evaluations per denoising step, in the order the batch is stacked.
EVALUATIONS: dict[Guidance, tuple[str, ...]] = {
    COMBINED: ("plain", "image", "full"),  # (no cache, empty), (cache, empty), (cache, text)
    JOINT: ("plain", "full"),  # (no cache, empty), (cache, text)
}

DEFAULT_TEXT_SCALE = 7.5
DEFAULT_IMAGE_SCALE = 0.35  # the authors' scripts use 0.3 to 0.4
# The ranges that run parameters and command lines accept (beyond them, images only degrade).
MAX_TEXT_SCALE = 30.0
MAX_IMAGE_SCALE = 10.0


def uses_image_scale(guidance: Guidance) -> bool:
    """Whether the mode has an image scale of its own (joint guidance has one scale, the text scale)."""
    return "image" in EVALUATIONS[guidance]


def combined_guidance(
    eps_plain: torch.Tensor, eps_image: torch.Tensor, eps_full: torch.Tensor, image_scale: float | torch.Tensor,
    text_scale: float,
) -> torch.Tensor:
    """`image_scale` may vary over the image ((n, 1, h, w), broadcast): a placed product's cache acts near it only."""
    return eps_plain + image_scale * (eps_image - eps_plain) + text_scale * (eps_full - eps_image)


def joint_guidance(eps_plain: torch.Tensor, eps_full: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_plain + scale * (eps_full - eps_plain)


def combine(guidance: Guidance, eps: torch.Tensor, image_scale: float | torch.Tensor, text_scale: float) -> torch.Tensor:
    """Split a stacked prediction (one chunk per evaluation, in EVALUATIONS order) and combine it."""
    if guidance == COMBINED:
        plain, image, full = eps.chunk(3)
        return combined_guidance(plain, image, full, image_scale, text_scale)
    if guidance == JOINT:
        plain, full = eps.chunk(2)
        return joint_guidance(plain, full, text_scale)
    raise ValueError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}")
