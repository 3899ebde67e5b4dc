"""Samplers by name: the model's own, or one of diffusers' schedulers built from the model's config.

The name is what a run records per shot (`generations.sampler`), so a shot says how it was made.
Each is built with `from_config(model's scheduler config)`: the noise schedule (betas, prediction
type, zero-SNR rescaling) stays the model's and only the solver changes.

ddim                DDIM (the authors' sampler; `eta` 0 is deterministic, 1 adds DDPM-like noise)
dpm++2m             DPM-Solver++ (2M), the usual choice for 15-25 steps
dpm++2m-karras      the same on Karras sigmas
euler-a             Euler ancestral (stochastic)
unipc               UniPC (multistep predictor-corrector)
model               whatever scheduler the base model ships (PNDM for the hub's SD 2.1 base)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

Sampler = Literal["model", "ddim", "dpm++2m", "dpm++2m-karras", "euler-a", "unipc"]
SAMPLERS: tuple[str, ...] = ("model", "ddim", "dpm++2m", "dpm++2m-karras", "euler-a", "unipc")
# Samplers whose step takes `eta` (the others have no such knob and refuse a non-zero one).
TAKES_ETA = ("ddim",)


def make_scheduler(name: str, model_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A fresh scheduler `name` on the noise schedule of `model_scheduler` (the base model's own)."""
    # Imported here: the names and `check_eta` are read where diffusers is not loaded (run parameters, the CLI).
    from diffusers import (
        DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, UniPCMultistepScheduler,
    )

    config = model_scheduler.config
    if name == "model":
        return type(model_scheduler).from_config(config)
    if name == "ddim":
        # Latents are never clipped (DDIM's default clips x0 to [-1, 1], meant for pixel-space models); a
        # base whose scheduler config does not say, such as a PNDM built in code, gets the SD value.
        return DDIMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))
    if name in ("dpm++2m", "dpm++2m-karras"):
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=name.endswith("karras"),
            # the last step lands on the clean sample rather than one more noisy step: sharper at few steps
            final_sigmas_type="zero")
    if name == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def check_eta(name: str, eta: float) -> None:
    if eta and name not in TAKES_ETA:
        raise ValueError(f"eta {eta} applies to {', '.join(TAKES_ETA)} only, not {name!r}: set eta to 0")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta {eta} must lie between 0 (deterministic DDIM) and 1")
