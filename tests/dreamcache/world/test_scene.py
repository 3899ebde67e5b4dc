import re
from collections import Counter

import numpy as np
import pytest

from dreamcache.world import scene as world


def test_the_world_is_deterministic_by_seed():
    a, b, c = world.triplet(7, 64), world.triplet(7, 64), world.triplet(8, 64)
    assert np.array_equal(np.asarray(a.target), np.asarray(b.target)) and a.caption == b.caption
    assert np.array_equal(np.asarray(a.reference), np.asarray(b.reference))
    assert not np.array_equal(np.asarray(a.target), np.asarray(c.target))
    assert world.product(123) == world.product(123)


def test_captions_name_only_the_family_and_the_scene():
    words = {w for values in (world.COLORS, world.PATTERNS, world.GLYPHS, world.PLACES, world.PROPORTIONS)
             for w in values}
    for seed in range(200):
        t = world.triplet(seed, 32)
        assert t.caption == f"a {t.product.family} {world.SCENES[t.scene]}"
        assert not words & set(re.findall(r"[a-z]+", t.caption))


def test_masks_are_exact():
    for seed in range(20):
        t = world.triplet(seed, 64)
        rng = np.random.default_rng([seed, t.product.index, 1])
        backdrop = np.asarray(world.background(t.scene, 64, rng), dtype=int)
        changed = np.abs(np.asarray(t.target, dtype=int) - backdrop).sum(axis=2) > 0
        assert t.mask.any()
        assert not (changed & ~t.mask).any()  # nothing drawn outside the mask
        assert changed[t.mask].mean() > 0.9  # and the mask is the product (faint edge pixels may round away)


def test_held_out_instances_never_appear_in_training():
    assert all(not world.is_held_out(world.triplet(s, 32).product.index) for s in range(300))
    assert all(world.is_held_out(world.triplet(s, 32, held_out=True).product.index) for s in range(50))


@pytest.mark.parametrize("held_out", [False, True])
def test_triplets_draw_every_family_evenly(held_out):
    families = Counter(world.triplet(s, 16, held_out=held_out).product.family for s in range(600))
    assert set(families) == set(world.FAMILIES)
    assert max(families.values()) < 2 * min(families.values())  # 100 each expected


@pytest.mark.parametrize("family", world.FAMILIES)
def test_every_family_renders_in_every_scene(family):
    index = world.FAMILIES.index(family) + 6  # instance 6 + k is of family k
    item = world.product(index)
    assert item.family == family
    for scene in world.SCENES:
        image, mask = world.scene_image(item, scene, 48, seed=1)
        assert image.size == (48, 48) and 0.02 < mask.mean() < 0.9
    reference = np.asarray(world.reference_image(item, 48, seed=1))
    assert (reference[0, 0] == 255).all() and (reference < 250).any()


def test_every_family_has_held_out_instances():
    held_out = world.held_out_products(12)
    assert [p.family for p in held_out] == list(world.FAMILIES) * 2
    assert all(world.is_held_out(p.index) for p in held_out)
    assert sum(world.is_held_out(i) for i in range(600)) == 60  # one instance in ten
