"""A run takes the model's recommended settings wherever its parameters leave them to the model, filled the
way the library fills a None (`Recommended.resolve`): one home for the defaults."""

import pytest

from dreamcache.core.weights import AUTHORS_INFERENCE, Recommended
from flows.platform.params import CatalogueRunParams

MODEL = Recommended(steps=10, images_per_prompt=1, image_scale=5.0, text_scale=4.0, sampler="ddim", eta=0.3,
                    negative_prompt="blurred")


def settings(params: CatalogueRunParams) -> tuple:
    return (params.steps, params.images_per_prompt, params.image_scale, params.text_scale, params.sampler, params.eta,
            params.negative_prompt)


def test_a_run_left_to_the_model_takes_every_recommended_setting():
    # text scale and eta too: the run used to keep 7.5 and 0 whatever the model recommended
    params = CatalogueRunParams(source="s", prompts=["a"]).with_recommended(MODEL)
    assert settings(params) == (10, 1, 5.0, 4.0, "ddim", 0.3, "blurred")
    assert settings(params) == settings(params.with_recommended(MODEL))  # filled once, nothing left to fill


def test_a_runs_own_settings_win_and_another_sampler_leaves_the_models_eta():
    own = CatalogueRunParams(source="s", prompts=["a"], steps=3, images_per_prompt=2, image_scale=1.0, text_scale=2.0,
                             sampler="unipc", negative_prompt="dark").with_recommended(MODEL)
    assert settings(own) == (3, 2, 1.0, 2.0, "unipc", 0.0, "dark")
    named = CatalogueRunParams(source="s", prompts=["a"], sampler="ddim").with_recommended(MODEL)
    assert (named.sampler, named.eta) == ("ddim", 0.0)  # a sampler named by the run: its eta is the run's (0)
    noisier = CatalogueRunParams(source="s", prompts=["a"], eta=0.8).with_recommended(MODEL)
    assert (noisier.sampler, noisier.eta) == ("ddim", 0.8)


def test_the_run_fills_its_settings_as_the_library_fills_a_none():
    params = CatalogueRunParams(source="s", prompts=["a"], steps=3, sampler="unipc").with_recommended(AUTHORS_INFERENCE)
    library = AUTHORS_INFERENCE.resolve(steps=3, sampler="unipc")
    assert settings(params) == (library.steps, library.images_per_prompt, library.image_scale, library.text_scale,
                                library.sampler, library.eta, library.negative_prompt)


def test_an_eta_the_models_sampler_does_not_take_is_named():
    with pytest.raises(ValueError, match="eta 0.5 applies to ddim only, not 'unipc'"):
        CatalogueRunParams(source="s", prompts=["a"], eta=0.5).with_recommended(Recommended(sampler="unipc"))


def test_every_recommended_setting_that_is_a_run_parameter_is_left_to_the_model_by_its_default():
    from dataclasses import fields

    from flows.platform.params import LEFT_TO_MODEL

    assert set(LEFT_TO_MODEL) == {f.name for f in fields(Recommended)} & set(CatalogueRunParams.model_fields)
    assert {"steps", "text_scale", "eta", "deep_reuse_interval"} <= set(LEFT_TO_MODEL)
    model = Recommended(steps=7, images_per_prompt=3, image_scale=2.5, text_scale=3.5, sampler="ddim", eta=0.2,
                        negative_prompt="grainy", deep_reuse_interval=2)
    params = CatalogueRunParams(source="s", prompts=["a"]).with_recommended(model)
    assert {name: getattr(params, name) for name in LEFT_TO_MODEL} == {name: getattr(model, name)
                                                                       for name in LEFT_TO_MODEL}


def test_no_reuse_recommended_is_written_1_not_the_unset_0():
    params = CatalogueRunParams(source="s", prompts=["a"]).with_recommended(MODEL)  # MODEL recommends no reuse
    assert params.deep_reuse_interval == 1
    assert params.with_recommended(Recommended(deep_reuse_interval=3)).deep_reuse_interval == 1  # filled: kept
