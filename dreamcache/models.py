"""Loading the base pipeline and adapters named by the settings, the bundled model included."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dreamcache.architectures import build_tiny_pipeline_components
from dreamcache.config import BUNDLED_MODEL, Settings
from dreamcache.denoiser import FastPaths
from dreamcache.pipeline import DreamCachePipeline
from dreamcache.scoring import Scorer
from dreamcache.segmentation import Segmenter, build_segmenter

logger = logging.getLogger(__name__)

# Bump when the bundled model's construction changes, so stale copies are rebuilt.
_BUNDLED_VERSION = 1


def is_bundled_untrained(settings: Settings) -> bool:
    return settings.base_model == BUNDLED_MODEL


def materialise_bundled_model(models_dir: Path) -> tuple[Path, Path]:
    """Write the bundled model in the diffusers layout (once), so it loads like any other base.

    Until the project ships trained weights the bundled model is a tiny randomly initialised
    Stable-Diffusion-architecture pipeline with freshly initialised adapters: it runs, and
    its images are noise.
    """
    base, adapter = models_dir / "tiny-random", models_dir / "tiny-random-adapter"
    stamp = models_dir / "tiny-random.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == _BUNDLED_VERSION:
        return base, adapter
    pipe = DreamCachePipeline(
        **build_tiny_pipeline_components(seed=0), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(base)
    pipe.load_dreamcache(preset="default")
    pipe.save_dreamcache(adapter)
    stamp.write_text(json.dumps({"version": _BUNDLED_VERSION}))
    return base, adapter


def load_pipeline(settings: Settings, progress: bool = False) -> DreamCachePipeline:
    """The base pipeline with adapters attached, on the configured device and dtype."""
    from diffusers.utils import logging as diffusers_logging

    base, adapter = settings.base_model, settings.adapter
    if base == BUNDLED_MODEL:
        bundled_base, bundled_adapter = materialise_bundled_model(settings.models_dir)
        base, adapter = str(bundled_base), adapter or str(bundled_adapter)
    bars = diffusers_logging.is_progress_bar_enabled()
    if not progress:
        diffusers_logging.disable_progress_bar()  # diffusers has no per-call switch for its loading bar
    try:
        pipe = DreamCachePipeline.from_pretrained(base, dtype=settings.torch_dtype)
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    pipe.to(settings.torch_device)
    if adapter:
        pipe.load_dreamcache(adapter)
    else:
        logger.warning("no adapter configured for %s: using untrained adapters (preset %r)", base, settings.preset)
        pipe.load_dreamcache(preset=settings.preset)
    pipe.enable_fast_paths(FastPaths.off() if settings.fast_paths == "off" else None)
    return pipe


def load_segmenter(settings: Settings) -> Segmenter:
    return build_segmenter(settings.sam_checkpoint, settings.sam_model_type, settings.detector_model,
                           settings.torch_device)


def load_scorer(settings: Settings, segmenter: Segmenter | None = None) -> Scorer:
    return Scorer(settings.clip_model, settings.dino_model, segmenter or load_segmenter(settings),
                  settings.torch_device)
