"""Loading the base pipeline and adapters named by the settings, the bundled model included."""

from __future__ import annotations

import logging

from dreamcache.app.config import Settings
from dreamcache.core.denoiser import FastPaths
from dreamcache.core.pipeline import DreamCachePipeline
from dreamcache.perception.scoring import Scorer
from dreamcache.perception.segmentation import Segmenter, build_segmenter

logger = logging.getLogger(__name__)


def load_pipeline(settings: Settings, progress: bool = False) -> DreamCachePipeline:
    """The base pipeline with adapters attached, on the configured device and dtype."""
    from diffusers.utils import logging as diffusers_logging

    base, adapter = settings.resolved_base_model, settings.resolved_adapter
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
    world = settings.resolved_world_segmenter
    if world is not None:
        from dreamcache.world.segmenter import WorldSegmenter

        return WorldSegmenter.from_pretrained(world)
    return build_segmenter(settings.sam_checkpoint, settings.sam_model_type, settings.detector_model,
                           settings.torch_device)


def load_scorer(settings: Settings, segmenter: Segmenter | None = None) -> Scorer:
    return Scorer(settings.resolved_clip_model, settings.resolved_dino_model, segmenter or load_segmenter(settings),
                  settings.torch_device)
