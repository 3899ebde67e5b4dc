"""The scores' names and how shots rank by them, without the models (`scoring` computes the scores): the run
parameters, the review and the publishing read these where torch is not loaded."""

from __future__ import annotations

# The scores' names, one spelling everywhere: sidecars, SQL views' columns, the CLI, review rules, the
# Prefect form. Listed masked first: they judge the product, clip_t the prompt, the others the whole shot.
METRICS = ("mdino", "mclip_i", "clip_t", "dino", "clip_i")
# Best shot first by these (then by id): masked DINO judges the product alone; DINO stands in where
# masking found no product, and the CLIP scores where no DINO model is configured.
RANKING = ("mdino", "dino", "mclip_i", "clip_i")


def metric_name(metric: str, masked: bool) -> str:
    """The score's name: `metric` ("dino", "clip_i", "clip_t") prefixed "m" when masked."""
    return ("m" if masked else "") + metric


def canonical_name(name: str) -> str:
    """A score's name as older sidecars and `dreamcache score` wrote it ("mclip-i") in today's spelling."""
    return name.replace("-", "_")


def ranking_key(scores: dict[str, float]) -> tuple:
    """Sort key of a shot by RANKING, best first: the first metric it has decides; shots without one come after."""
    return tuple((0, -scores[m]) if m in scores else (1, 0.0) for m in RANKING)
