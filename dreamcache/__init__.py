"""DreamCache: finetuning-free personalisation of Stable Diffusion from cached reference features.

The public names are imported lazily so that `dreamcache --help` does not pay for torch.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "DreamCachePipeline": "dreamcache.core.pipeline",
    "FeatureCache": "dreamcache.core.cache",
    "CacheMetadata": "dreamcache.core.cache",
    "Settings": "dreamcache.app.config",
    "resolve_preset": "dreamcache.core.layers",
    "PRESETS": "dreamcache.core.layers",
    "convert_original_checkpoint": "dreamcache.core.weights",
    "DreamCacheError": "dreamcache.core.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dreamcache' has no attribute {name!r}")
