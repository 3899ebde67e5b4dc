"""The synthetic triplet pipeline: captions, targets from a diffusers text-to-image model, masks, manifest."""

import json

from PIL import Image

from dreamcache.training import synthetic
from dreamcache.training.data import load_manifest
from dreamcache.perception.segmentation import BorderColourSegmenter
from flows.runs.synthetic import SyntheticParams, plan_items, run_embedded
from tests.helpers import scene


def test_grammar_captions_are_filtered_for_duplicates_and_diversity():
    captions = synthetic.grammar_captions(50, seed=1)
    assert len({c for c, _ in captions}) == 50 and all(cat in c for c, cat in captions)
    doubled = captions[:5] + captions[:5] + [("a photo of a mug on a sandy beach!", "mug"),
                                              ("a photo of a mug on a sandy beach", "mug")]
    kept = synthetic.filter_captions(doubled, max_similarity=0.8)
    assert len(kept) <= 6 and len({c for c, _ in kept}) == len(kept)


def test_items_are_named_by_caption_and_seed():
    params = SyntheticParams(output="x", count=20, seed=3)
    first, again = plan_items(params), plan_items(params)
    assert [i.id for i in first] == [i.id for i in again] and len({i.id for i in first}) == len(first)


def test_targets_come_from_a_diffusers_pipeline_and_are_not_redone(platform_env, tiny_model, tmp_path):
    params = SyntheticParams(output=str(tmp_path / "synthetic"), count=5, steps=2, shard_size=2,
                             text_to_image=str(tiny_model / "base"))
    summary = run_embedded(params)
    items = len(plan_items(params))  # after the diversity filter
    targets = sorted((tmp_path / "synthetic" / "targets").glob("*.png"))
    assert 3 <= summary["items"] == items == len(targets)
    assert all(Image.open(t).size == (32, 32) for t in targets)
    assert summary["triplets"] + len(summary["rejected"]) == items  # every item accounted for
    stamps = [t.stat().st_mtime_ns for t in targets]
    run_embedded(params)
    assert [t.stat().st_mtime_ns for t in targets] == stamps  # resumed: nothing rendered twice


def test_segmented_targets_become_trainable_triplets(tmp_path):
    items = [synthetic.item_for(f"a mug on scene {i}", "mug", i) for i in range(3)]
    (tmp_path / "targets").mkdir()
    for i, item in enumerate(items):
        scene(background=(60 + 50 * i, 140, 200), size=(80, 80), box=(20, 16, 60, 70))[0].save(
            tmp_path / "targets" / f"{item.id}.png")
    Image.new("RGB", (80, 80), (128, 128, 128)).save(tmp_path / "targets" / "blank.png")
    blank = synthetic.SyntheticItem("blank", "a mug nowhere", "mug", 9)
    triplets, rejected = synthetic.segment_targets(BorderColourSegmenter(), items + [blank], tmp_path, resolution=64)
    assert [t.id for t in triplets] == [i.id for i in items]
    assert rejected[0][0] == "blank" and "mask is blank" in rejected[0][1]
    assert synthetic.write_manifest(triplets, tmp_path / "triplets.jsonl") == 3
    assert synthetic.write_manifest(triplets, tmp_path / "triplets.jsonl") == 0  # resumable, no duplicates
    loaded, report = load_manifest(tmp_path / "triplets.jsonl")
    assert report.usable == 3 and not report.skipped
    reference = Image.open(tmp_path / loaded[0].reference)
    assert reference.size == (64, 64) and reference.getpixel((0, 0)) == (255, 255, 255)
    assert json.loads((tmp_path / "triplets.jsonl").read_text().splitlines()[0])["caption"] == "a mug on scene 0"


def test_the_flow_runs_one_child_run_per_shard(prefect_server, platform_env, tiny_model, tmp_path):
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runs.synthetic import synthesize_triplets

    params = SyntheticParams(output=str(tmp_path / "synthetic"), count=6, steps=2, shard_size=2,
                             text_to_image=str(tiny_model / "base"))
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        summary = synthesize_triplets(params)

        async def shard_runs():
            async with get_client() as client:
                return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["synthetic-shard"])))

        runs = asyncio.run(shard_runs())
    shards = -(-summary["items"] // 2)
    assert len([r for r in runs if r.state.is_completed()]) >= shards
    assert len(list((tmp_path / "synthetic" / "targets").glob("*.png"))) == summary["items"]
