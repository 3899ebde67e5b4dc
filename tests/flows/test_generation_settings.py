"""A shot's settings are one typed record (flows/steps/generation_settings.py): the plan hashes it, the columns are
derived from it, and the generation step reads it. Its JSON and hash are those of every shot made before it
existed, or a re-run would make them all again."""

from types import SimpleNamespace

import pytest

from flows.platform.params import CatalogueRunParams, Format
from flows.steps.generation_settings import GenerationSettings
from flows.steps.plan import generation_settings


class UniPCMultistepScheduler:  # the base model's own scheduler, recorded by its class name
    pass


PLATFORM = SimpleNamespace(
    pipeline=SimpleNamespace(resolution=64, size_multiple=8, scheduler=UniPCMultistepScheduler()),
    identity=SimpleNamespace(base_model_id="tiny-sd", adapter_id="adapter@abc", base_model_revision="rev1"))

# The settings of four kinds of shot, and the hashes the plan gave them before GenerationSettings existed.
CASES = {
    "bundled model's defaults": (dict(steps=10, image_scale=5, text_scale=7.5, sampler="unipc"), "1:1",
                                 "25eac6d4267e5d492fd4d6e4e90bb2c89946f15963c1d9e1269ce77585fb2401"),
    "model's own scheduler": (dict(steps=50, image_scale=0.35, text_scale=7.5, sampler="model"), "1:1",
                              "8d98badcdfa26033001aca2d0069e2188b79f8d1a73371b7bd3c74e39d32e038"),
    "ddim, eta, negative prompt, reuse, a format": (
        dict(steps=20, image_scale=1.0, text_scale=4, sampler="ddim", eta=0.3, negative_prompt="blurry",
             deep_reuse_interval=2), "4:5@1080", "fc54cba0d6cbb7d7b79b9cfe71be5d00fbc11f99e6d376fe1aad1ec286a6e97c"),
    "joint guidance, placed": (
        dict(steps=8, text_scale=6.0, image_scale=2.0, guidance="joint", sampler="euler-a", mode="place",
             placement_x=0.4, shadow="none"), "16:9", "89179e3d7f45824c37aac2673f74e5b6d9536fda2ec9372ba053ea7a0cceb922"),
}


def _settings(name: str) -> GenerationSettings:
    update, shop_format, _ = CASES[name]
    params = CatalogueRunParams(source="s", prompts=["a"]).model_copy(update=update)  # as with_recommended fills
    return generation_settings(PLATFORM, params, Format.parse(shop_format))


@pytest.mark.parametrize("name", CASES)
def test_the_settings_hash_as_the_shots_made_before_them(name):
    assert _settings(name).sha256 == CASES[name][2]


def test_a_whole_number_stays_whole_in_the_record():
    record = _settings("bundled model's defaults").record()
    assert record["image_scale"] == 5 and isinstance(record["image_scale"], int)


def test_settings_at_their_defaults_are_left_out_of_the_record():
    record = _settings("bundled model's defaults").record()
    assert not {"eta", "negative_prompt", "deep_reuse_interval", "mode", "placement", "aspect", "canvas",
                "size"} & set(record)
    assert record["sampler"] == "unipc"


def test_the_columns_are_derived_from_the_settings():
    settings = _settings("joint guidance, placed")
    columns = settings.columns()
    assert columns["image_scale"] is None and columns["mode"] == "place" and columns["aspect"] == "16:9"
    assert (columns["width"], columns["height"]) == settings.size == (112, 64)
    assert _settings("bundled model's defaults").columns()["aspect"] == "1:1"
    assert (_settings("bundled model's defaults").columns()["width"], _settings("bundled model's defaults")
            .columns()["height"]) == (64, 64)


def test_a_recorded_shot_reads_back_from_its_record_and_its_columns():
    settings = _settings("model's own scheduler")
    row = SimpleNamespace(parameters=settings.record(), **settings.columns())
    assert GenerationSettings.of(row) == settings and GenerationSettings.of(row).record() == row.parameters
    assert settings.sampler == "UniPCMultistepScheduler" and settings.scheduler == "model"


def test_an_old_record_lacking_a_setting_takes_it_from_its_column():
    row = SimpleNamespace(parameters={"guidance": "combined", "steps": 4, "text_scale": 7.5, "image_scale": 0.35,
                                      "resolution": 64},
                          guidance="combined", text_scale=7.5, image_scale=0.35, steps=4, sampler="ddim", resolution=64,
                          base_model_id="tiny-sd", adapter_id="a@1", eta=0.0, negative_prompt="", mode="generate",
                          aspect="1:1")
    settings = GenerationSettings.of(row)
    assert (settings.scheduler, settings.adapter_id, settings.canvas_size, settings.placement) == (
        "ddim", "a@1", (64, 64), None)
