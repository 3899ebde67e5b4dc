import pytest
import torch

from dreamcache.core.adapter import DreamCacheAdapter
from dreamcache.core.architectures import build_unet
from dreamcache.core.layers import resolve_preset, transformers

RELEASED_LAYERS = [
    "mid_block.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.1",
]


@pytest.mark.parametrize("unet_fixture", ["sd15_unet", "sd21_unet"])
def test_default_preset_is_the_released_layout(request, unet_fixture):
    unet = request.getfixturevalue(unet_fixture)
    layers = resolve_preset(unet, "default")
    assert [layer.name for layer in layers] == RELEASED_LAYERS
    assert [(layer.channels, layer.tokens(512)) for layer in layers] == [
        (1280, 64), (1280, 256), (640, 1024), (640, 1024), (320, 4096)
    ]
    assert sum(layer.adapter_parameters for layer in layers) == 25_207_040
    assert sum(layer.channels * layer.tokens(512) for layer in layers) == 3_031_040


def test_sd15_has_sixteen_transformers_by_stage(sd15_unet):
    stages = [layer.stage for layer in transformers(sd15_unet)]
    assert (stages.count("encoder"), stages.count("middle"), stages.count("decoder")) == (6, 1, 9)


def test_ablation_presets(sd15_unet):
    names = {p: [layer.name for layer in resolve_preset(sd15_unet, p)] for p in ("middle", "decoder", "encoder", "all")}
    assert names["middle"] == ["mid_block.attentions.0"]
    assert names["decoder"] == RELEASED_LAYERS[1:]
    assert names["encoder"] == [f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)]
    assert len(names["all"]) == 16


def test_sdxl_default_follows_the_same_rule():
    layers = resolve_preset(build_unet("sdxl"), "default")
    assert [layer.name for layer in layers] == [
        "mid_block.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0", "up_blocks.1.attentions.2"
    ]
    assert [layer.tokens(1024) for layer in layers] == [1024, 1024, 4096, 4096]


def test_parameter_formula_matches_the_module(sd15_unet):
    for layer in resolve_preset(sd15_unet, "all"):
        with torch.device("meta"):
            adapter = DreamCacheAdapter.for_layer(layer)
        d = layer.inner_dim
        assert sum(p.numel() for p in adapter.parameters()) == layer.adapter_parameters == 6 * d * d + 4 * d


def test_unknown_preset_names_the_choices(sd15_unet):
    with pytest.raises(ValueError, match="unknown layer preset 'everything'.*default"):
        resolve_preset(sd15_unet, "everything")


def test_tiny_model_resolves_from_structure(tiny_pipe):
    layers = resolve_preset(tiny_pipe.unet, "default")
    assert [layer.name for layer in layers] == ["mid_block.attentions.0", "up_blocks.1.attentions.1",
                                                "up_blocks.2.attentions.1"]
    # 32 px image -> 16 px latent; the middle works at a quarter of that.
    assert [layer.tokens(32, vae_scale=2) for layer in layers] == [16, 64, 256]
