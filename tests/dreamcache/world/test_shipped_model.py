"""The shipped product-world model personalises: a CPU fidelity check with the committed weights.

Six held-out products (one per family, never seen in training), two scenes, one seed, at the bundled
model's recommended settings (its adapter config: UniPC, 10 steps, image scale 5), as a user's run
samples it. The bars leave room for arithmetic differences between CPUs, not for a model that stopped
personalising (the full evaluation's figures: docs/toy-world.md).
"""

from dataclasses import replace

import pytest

from dreamcache.app.config import BUNDLED_DIR
from dreamcache.core.weights import read_adapter_config
from dreamcache.world.evaluation import CHANCE, TEXT_ONLY, Cases, FidelityEvaluator, evaluate, personalised


@pytest.fixture(scope="module")
def results():
    recommended = read_adapter_config(BUNDLED_DIR / "adapter").recommended
    evaluator = FidelityEvaluator(BUNDLED_DIR, steps=recommended.steps, batch_size=12)
    cases = Cases.held_out(6, scenes=("beach", "snow"), seeds=(0,))
    conditions = [replace(c, sampler=recommended.sampler) for c in (TEXT_ONLY, personalised(recommended.image_scale))]
    return evaluate(evaluator, cases, conditions)["results"]


def test_the_cache_carries_the_products_identity_into_the_shot(results):
    text_only, cache = results["text-only"]["identity"], results["cache"]["identity"]
    assert cache >= text_only + 0.05, (text_only, cache)
    chance = sum(CHANCE.values()) / len(CHANCE)
    assert abs(text_only - chance) < 0.1  # without the cache the model cannot know the product


def test_the_prompt_still_decides_the_scene(results):
    assert results["cache"]["scene"] >= 0.9 and results["text-only"]["scene"] >= 0.9
    assert results["cache"]["clip_t"] >= 0.9 * results["text-only"]["clip_t"]


def test_the_classifier_reads_true_renders(results):
    assert results["ceiling (true renders)"]["identity"] >= 0.8
