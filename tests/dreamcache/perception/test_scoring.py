import logging

import pytest
from PIL import Image

from dreamcache.perception.scoring import Scorer
from dreamcache.perception.segmentation import BorderColourSegmenter
from tests.helpers import save_tiny_scorers, scene


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    clip, dino = save_tiny_scorers(tmp_path_factory.mktemp("scorers"))
    return Scorer(clip, dino, segmenter=BorderColourSegmenter())


def by_name(scores):
    return {s.name: s.value for s in scores}


def test_identical_images_score_one(scorer):
    image, _ = scene(background=(240, 240, 240))
    (scores,) = scorer.score([image], [image], ["a mug"], ["mug"])
    values = by_name(scores)
    assert set(values) == {"clip_i", "clip_t", "dino", "mclip_i", "mdino"}
    for label in ("clip_i", "dino", "mclip_i", "mdino"):
        assert values[label] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= values["clip_t"] <= 1.0


def test_a_changed_background_lowers_only_the_unmasked_scores(scorer):
    studio, _ = scene(background=(245, 245, 245))
    beach, _ = scene(background=(230, 200, 120))
    (scores,) = scorer.score([beach], [studio], ["a mug on a beach"], ["mug"])
    values = by_name(scores)
    assert values["mdino"] == pytest.approx(1.0, abs=2e-3) and values["mclip_i"] == pytest.approx(1.0, abs=2e-3)
    assert values["dino"] < values["mdino"] - 0.01 and values["clip_i"] < values["mclip_i"] - 0.01


def test_scores_carry_the_scorer_model(scorer):
    image, _ = scene()
    (scores,) = scorer.score([image], [image], ["a mug"])
    assert {s.scorer_model_id.rsplit("/", 1)[-1] for s in scores} == {"clip", "dino"}


def test_an_unsegmentable_shot_gets_no_masked_score(scorer, caplog):
    product, _ = scene()
    blank = Image.new("RGB", product.size, (128, 128, 128))
    with caplog.at_level(logging.INFO):
        (scores,) = scorer.score([blank], [product], ["a mug"], ["mug"], names=["MUG-1 seed 3"])
    assert set(by_name(scores)) == {"clip_i", "clip_t", "dino"}
    said = [r for r in caplog.records if "MUG-1 seed 3 (generated): mask is blank" in r.getMessage()]
    # Said, quietly: a shot without its product is no fault (a run counts them in one summary line).
    assert said and all(r.levelno == logging.INFO for r in said)


def test_without_models_nothing_is_recorded(caplog):
    with caplog.at_level(logging.WARNING):
        scorer = Scorer()
    image, _ = scene()
    assert not scorer.available
    assert scorer.score([image], [image], ["a mug"]) == [[]]
    assert "no CLIP (DREAMCACHE_CLIP_MODEL) or DINO (DREAMCACHE_DINO_MODEL) model configured" in caplog.text


def test_batches_give_the_same_scores(tmp_path):
    clip, dino = save_tiny_scorers(tmp_path)
    images = [scene(background=(240, 240, 240 - 20 * i))[0] for i in range(5)]
    refs = [scene()[0]] * 5
    whole = Scorer(clip, dino, batch_size=8).score(images, refs, ["a mug"] * 5)
    pieces = Scorer(clip, dino, batch_size=2).score(images, refs, ["a mug"] * 5)
    for a, b in zip(whole, pieces):
        assert [s.name for s in a] == [s.name for s in b]
        assert [s.value for s in a] == pytest.approx([s.value for s in b], abs=1e-5)


def test_the_bundled_model_scores_with_the_world_clip_dino_and_segmenter_in_float32(monkeypatch):
    import torch

    from dreamcache.app.config import BUNDLED_DIR, Settings
    from dreamcache.app.loading import load_scorer
    from dreamcache.world import scene as world

    for name in ("DREAMCACHE_CONFIG", "DREAMCACHE_BASE_MODEL", "DREAMCACHE_CLIP_MODEL", "DREAMCACHE_DINO_MODEL",
                 "DREAMCACHE_SAM_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)
    scorer = load_scorer(Settings(device="cpu"))
    assert scorer.clip.model_id == str(BUNDLED_DIR / "clip") and scorer.dino.model_id == str(BUNDLED_DIR / "dino")
    assert scorer.clip.model.dtype == torch.float32 and scorer.dino.model.dtype == torch.float32  # saved in float16
    assert scorer.segmenter.method == "world-unet"
    item = world.held_out_products(1)[0]
    # A lawn: the border-colour segmenter found no product there; the world's segmenter does.
    shot, _ = world.scene_image(item, "grass", 128, seed=0)
    (scores,) = scorer.score([shot], [world.reference_image(item, 128, seed=0)], [world.caption(item.family, "grass")],
                             [item.family])
    values = by_name(scores)
    assert set(values) == {"clip_i", "clip_t", "mclip_i", "dino", "mdino"}
    assert all(-1.0 <= v <= 1.0 for v in values.values())


def test_a_doubtful_mask_on_a_shot_scores_without_a_warning_and_still_warns_on_a_reference(scorer, caplog):
    from dreamcache.perception.segmentation import check_mask

    product, _ = scene(background=(240, 240, 240))
    # Two products side by side: the border-colour mask is fragmented (two parts of similar size).
    pair = Image.new("RGB", (product.width * 2, product.height), (240, 240, 240))
    pair.paste(product, (0, 0))
    pair.paste(product, (product.width, 0))
    pair = pair.resize(product.size)
    with caplog.at_level(logging.INFO):
        (scores,) = scorer.score([pair], [product], ["two mugs"], ["mug"], names=["MUG-1 seed 4"])
    assert {"mclip_i", "mdino"} <= set(by_name(scores))
    doubts = [r for r in caplog.records if "MUG-1 seed 4 (generated): mask is fragmented" in r.getMessage()]
    assert doubts and all(r.levelno == logging.INFO for r in doubts)
    # Outside scoring (a reference's cut-out, which every shot inherits) the same doubt is a warning.
    caplog.clear()
    mask = scorer.segmenter.segment(pair, "mug", "MUG-1 (reference)").mask
    with caplog.at_level(logging.INFO):
        check_mask(mask, "border", "MUG-1 (reference)")
    assert any(r.levelno == logging.WARNING and "fragmented" in r.getMessage() for r in caplog.records)
