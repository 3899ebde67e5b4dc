import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreamcache.core.errors import AdapterWeightsError
from dreamcache.core.weights import CONFIG_NAME, WEIGHTS_NAME, expected_shapes
from tests.helpers import TEST_RESOLUTION, make_tiny_pipeline, product_image


def generate(pipe, prompts, subjects, seeds, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return np.stack(pipe(prompts, subject=subjects, seed=seeds, output_type="np", progress=False, **kwargs).images)


def test_generates_one_image_per_prompt(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    images = tiny_pipe(["a mug on a beach", "a mug in snow"], subject=cache, num_inference_steps=2, progress=False).images
    assert [image.size for image in images] == [(TEST_RESOLUTION, TEST_RESOLUTION)] * 2


def test_each_image_depends_only_on_its_own_prompt_subject_and_seed(tiny_pipe):
    red = tiny_pipe.cache_subject(product_image((220, 20, 20)))
    blue = tiny_pipe.cache_subject(product_image((20, 20, 220), shape="box"))
    prompts = ["a mug on a beach", "a box in snow", "a lamp", "a mug in a forest"]
    subjects, seeds = [red, blue, None, red], [5, 6, 7, 8]
    together = generate(tiny_pipe, prompts, subjects, seeds, batch_size=4)
    in_pairs = generate(tiny_pipe, prompts, subjects, seeds, batch_size=2)
    np.testing.assert_allclose(together, in_pairs, atol=1e-4)
    alone = generate(tiny_pipe, prompts[1:2], [blue], [6])
    np.testing.assert_allclose(together[1:2], alone, atol=1e-4)


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    a, b, c = (generate(tiny_pipe, ["a mug"], [cache], [s]) for s in (1, 1, 2))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_image_scale_is_settable(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    default = generate(tiny_pipe, ["a mug"], [cache], [0])
    tiny_pipe.set_dreamcache_scale(3.0)
    assert np.abs(generate(tiny_pipe, ["a mug"], [cache], [0]) - default).max() > 1e-3
    np.testing.assert_allclose(generate(tiny_pipe, ["a mug"], [cache], [0], image_guidance_scale=0.35), default,
                               atol=1e-6)


def test_any_diffusers_scheduler(tiny_pipe):
    from diffusers import EulerDiscreteScheduler

    cache = tiny_pipe.cache_subject(product_image())
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    images = generate(tiny_pipe, ["a mug"], [cache], [0], guidance="joint")
    assert images.shape == (1, TEST_RESOLUTION, TEST_RESOLUTION, 3) and np.isfinite(images).all()


def test_unload_gives_back_the_plain_pipeline(tiny_pipe):
    plain = make_tiny_pipeline()
    tiny_pipe.cache_subject(product_image())
    tiny_pipe.unload_dreamcache()
    assert np.array_equal(generate(tiny_pipe, ["a lamp"], [None], [4]), generate(plain, ["a lamp"], [None], [4]))
    with pytest.raises(RuntimeError, match="load_dreamcache"):
        tiny_pipe.cache_subject(product_image())


def test_adapters_round_trip_and_only_adapters_are_written(tiny_pipe, tmp_path):
    cache = tiny_pipe.cache_subject(product_image())
    before = generate(tiny_pipe, ["a mug"], [cache], [0])
    tiny_pipe.save_dreamcache(tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["preset"] == "default"
    with safe_open(tmp_path / "adapter" / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert keys == set(expected_shapes(tiny_pipe.dreamcache_layers))
    assert not any(key.startswith(("conv_in", "time_embedding")) or ".attn1.to_q" in key for key in keys)

    fresh = make_tiny_pipeline()
    fresh.load_dreamcache(tmp_path / "adapter")
    for name, adapter in fresh.dreamcache_adapters.items():
        for key, tensor in adapter.state_dict().items():
            assert torch.equal(tensor, tiny_pipe.dreamcache_adapters[name].state_dict()[key])
    np.testing.assert_array_equal(generate(fresh, ["a mug"], [cache], [0]), before)


def test_adapters_for_another_architecture_are_refused(tiny_pipe, tmp_path):
    tiny_pipe.save_dreamcache(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["layers"][0]["name"] = "mid_block.attentions.1"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trained for another architecture"):
        make_tiny_pipeline().load_dreamcache(tmp_path / "adapter")


def test_misshapen_adapter_weights_are_named(tiny_pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_pipe.save_dreamcache(tmp_path / "adapter")
    path = tmp_path / "adapter" / WEIGHTS_NAME
    state = load_file(path)
    state["mid_block.attentions.0.linear_cat.weight"] = torch.zeros(3, 3)
    del state["up_blocks.1.attentions.1.norm_mem.bias"]
    save_file(state, path, metadata={"format": "dreamcache.adapter/1"})
    with pytest.raises(AdapterWeightsError) as error:
        make_tiny_pipeline().load_dreamcache(tmp_path / "adapter")
    assert "misshapen tensor mid_block.attentions.0.linear_cat.weight: (3, 3)" in str(error.value)
    assert "missing tensor up_blocks.1.attentions.1.norm_mem.bias" in str(error.value)


def test_weights_and_configs_of_another_format_are_refused(tiny_pipe, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    tiny_pipe.save_dreamcache(tmp_path / "adapter")
    path = tmp_path / "adapter" / WEIGHTS_NAME
    save_file(load_file(path), path)  # the same tensors, without the format the file is read by
    with pytest.raises(AdapterWeightsError, match="in format None.*convert-checkpoint"):
        make_tiny_pipeline().load_dreamcache(tmp_path / "adapter")
    tiny_pipe.save_dreamcache(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    for change, message in (({"format": "dreamcache.adapter/9"}, "format 'dreamcache.adapter/9'"),
                            ({"preset": "sideways"}, "unknown preset 'sideways'"),
                            ({"layers": [{"name": "mid_block.attentions.0", "channels": -1, "inner_dim": 32,
                                          "heads": 1}]}, "positive integers")):
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterWeightsError, match=message):
            make_tiny_pipeline().load_dreamcache(tmp_path / "adapter")
        config_path.write_text(json.dumps(config))


def test_bad_call_arguments_are_explained(tiny_pipe):
    with pytest.raises(ValueError, match="unknown guidance 'triple'"):
        tiny_pipe("a mug", guidance="triple")
    with pytest.raises(ValueError, match="2 prompts, 2 subjects, 3 seeds and 2 negative prompts"):
        tiny_pipe(["a", "b"], seed=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        tiny_pipe("a mug", sampler="lms")
    with pytest.raises(ValueError, match="eta 0.5 applies to ddim only, not 'unipc'"):
        tiny_pipe("a mug", sampler="unipc", eta=0.5)


def test_saved_bases_are_plain_stable_diffusion_without_adapter_tensors(tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny_pipe.save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    with safe_open(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert not any("adapter" in key or "processor" in key for key in f.keys())
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert set(plain.unet.state_dict()) == set(make_tiny_pipeline().unet.state_dict())
    assert tiny_pipe.dreamcache_adapters, "the adapters stay attached after saving the base"


def test_width_and_height_give_non_square_images(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    assert tiny_pipe.size_multiple == 8  # the tiny VAE's factor 2 times the UNet's 2 downsamplings
    for width, height in ((64, 32), (24, 48)):
        images = tiny_pipe(["a mug", "a lamp"], subject=[cache, None], width=width, height=height,
                           num_inference_steps=2, progress=False).images
        assert [image.size for image in images] == [(width, height)] * 2


def test_sizes_the_unet_cannot_take_are_named(tiny_pipe):
    with pytest.raises(ValueError, match=r"width 60 is not a positive multiple of 8 .*: use 56 or 64"):
        tiny_pipe("a mug", width=60)
    with pytest.raises(ValueError, match=r"height 5 is not a positive multiple of 8 .*: use 8$"):
        tiny_pipe("a mug", width=32, height=5)


def test_the_default_size_is_the_square_of_the_resolution(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    kwargs = dict(subject=cache, seed=1, num_inference_steps=3, output_type="np", progress=False)
    square = np.stack(tiny_pipe("a mug", **kwargs).images)
    explicit = np.stack(tiny_pipe("a mug", width=TEST_RESOLUTION, height=TEST_RESOLUTION, **kwargs).images)
    assert square.shape == (1, TEST_RESOLUTION, TEST_RESOLUTION, 3)
    assert np.array_equal(square, explicit)
    assert np.array_equal(np.stack(tiny_pipe("a mug", resolution=48, **kwargs).images),
                          np.stack(tiny_pipe("a mug", width=48, height=48, **kwargs).images))


def recommending(pipe, folder, **recommended):
    """The pipeline's adapters saved in `folder` with a config that recommends `recommended`."""
    pipe.save_dreamcache(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "recommended": recommended}))
    return folder


MODELS_WAY = dict(steps=2, images_per_prompt=1, image_scale=3.0, text_scale=4.0, sampler="ddim", eta=0.5,
                  negative_prompt="blurred", reference_mode="stretch")


def test_loaded_adapters_bring_their_recommended_settings_and_a_given_value_wins(tiny_pipe, tmp_path):
    from dreamcache.core.weights import Recommended

    model = Recommended(**MODELS_WAY)
    pipe = make_tiny_pipeline()
    pipe.load_dreamcache(recommending(tiny_pipe, tmp_path / "adapter", **MODELS_WAY))
    assert pipe.dreamcache_defaults == model
    assert f"defaults in force: {model}" in repr(pipe)
    cache = pipe.cache_subject(product_image())
    assert (cache.metadata.text, cache.metadata.reference_mode) == ("blurred", "stretch")  # the model's preparation
    assert cache.metadata == pipe.cache_subject(product_image(), **model.caching()).metadata

    run = lambda **kwargs: np.stack(pipe(["a mug"], subject=[cache], seed=[0], output_type="np", progress=False,
                                         **kwargs).images)
    unset = run()
    assert np.array_equal(unset, run(**model.sampling()))  # every None is the model's
    # A value given wins, and only it changes: here DDIM's noise.
    assert np.abs(run(eta=0.0) - unset).max() > 1e-3
    assert np.array_equal(run(eta=0.0), run(**{**model.sampling(), "eta": 0.0}))
    # Another sampler, given no eta, does not take the model's (DDIM's) eta.
    assert np.array_equal(run(sampler="unipc"), run(**{**model.sampling(), "sampler": "unipc", "eta": 0.0}))


def test_a_scale_the_caller_set_stays_over_the_recommended_one_and_unloading_restores_the_methods(tiny_pipe, tmp_path):
    from dreamcache.core.weights import Recommended

    adapter = recommending(tiny_pipe, tmp_path / "adapter", **MODELS_WAY)
    pipe = make_tiny_pipeline()
    pipe.set_dreamcache_scale(1.5)
    pipe.load_dreamcache(adapter)
    assert pipe.dreamcache_defaults.image_scale == 1.5 and pipe.dreamcache_defaults.steps == 2
    pipe.set_dreamcache_scale(None)
    assert pipe.dreamcache_defaults == Recommended(**MODELS_WAY)
    pipe.unload_dreamcache()
    assert pipe.dreamcache_defaults == Recommended()  # the method's: 50 steps, image scale 0.35, the base's scheduler
    assert "DreamCache adapters: none" in repr(pipe)


def test_saved_adapters_keep_their_recommendation_and_name_their_base_by_its_weights(tiny_pipe, tmp_path):
    from dreamcache.core.cache import model_fingerprint
    from dreamcache.core.weights import read_adapter_config

    plain = make_tiny_pipeline()
    base_fingerprint = model_fingerprint(plain.unet, plain.vae)
    tiny_pipe.save_pretrained(tmp_path / "base")
    pipe = type(tiny_pipe).from_pretrained(tmp_path / "base")
    pipe.load_dreamcache(recommending(tiny_pipe, tmp_path / "adapter", **MODELS_WAY))
    pipe.save_dreamcache(tmp_path / "again")
    config = read_adapter_config(tmp_path / "again")
    assert config.recommended == read_adapter_config(tmp_path / "adapter").recommended
    # Loaded from a folder of this machine: named by the base's own weights (adapters left out), not the folder.
    named = f"fingerprint:{base_fingerprint}"
    assert config.base_model == read_adapter_config(tmp_path / "adapter").base_model == named
    assert str(tmp_path) not in (tmp_path / "again" / CONFIG_NAME).read_text()
