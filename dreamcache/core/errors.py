"""Errors that name the thing that is wrong and say what to do."""


class DreamCacheError(Exception):
    """Base class of every error this library raises on purpose."""


class ReferenceImageError(DreamCacheError, ValueError):
    """A reference image cannot be used; the message names the file and the problem."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"reference image {source}: {problem}")


class CacheError(DreamCacheError):
    """A feature cache is corrupt, unreadable, or made for another model or layer preset."""


class AdapterWeightsError(DreamCacheError):
    """Adapter weights do not fit: unknown, missing or misshapen tensors, named one by one."""
