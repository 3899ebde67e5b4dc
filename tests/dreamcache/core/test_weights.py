"""The converter for the authors' checkpoint, on a synthetic one with the official key names."""

import pickle

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamcache.core.architectures import build_unet
from dreamcache.app.cli import app
from dreamcache.core.errors import AdapterWeightsError
from dreamcache.core.layers import resolve_preset
from dreamcache.core.weights import WEIGHTS_NAME, convert_original_checkpoint, load_adapters, read_adapter_config

# latent-diffusion block -> width in SD 2.1-base, as in the released cross_attention-<step>.pt
ORIGINAL_BLOCKS = {
    "middle_block.1": 1280,
    "output_blocks.4.1": 1280,
    "output_blocks.6.1": 640,
    "output_blocks.8.1": 640,
    "output_blocks.10.1": 320,
}


def original_state_dict(prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for block, d in ORIGINAL_BLOCKS.items():
        base = f"{prefix}{block}.transformer_blocks.0."
        shapes = {
            "attn_mem.to_q.weight": (d, d), "attn_mem.to_k.weight": (d, d), "attn_mem.to_v.weight": (d, d),
            "attn_mem.to_out.0.weight": (d, d), "attn_mem.to_out.0.bias": (d,),
            "norm2_mem.weight": (d,), "norm2_mem.bias": (d,),
            "linear_cat.weight": (d, 2 * d), "linear_cat.bias": (d,),
        }
        for key, shape in shapes.items():
            state[base + key] = torch.randn(shape, generator=g, dtype=torch.float16)
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("original") / "cross_attention-200000.pt"
    torch.save(original_state_dict(prefix="model.diffusion_model."), path)
    return path


def test_converts_to_a_loadable_adapter(checkpoint, tmp_path):
    config = convert_original_checkpoint(checkpoint, tmp_path / "adapter", architecture="sd21")
    assert config.preset == "default"
    assert config.layer_names == ["mid_block.attentions.0", "up_blocks.1.attentions.1", "up_blocks.2.attentions.0",
                                  "up_blocks.2.attentions.2", "up_blocks.3.attentions.1"]
    assert read_adapter_config(tmp_path / "adapter") == config

    converted = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    original = original_state_dict()
    assert sum(t.numel() for t in converted.values()) == 25_207_040
    pairs = {
        "up_blocks.3.attentions.1.attn_mem.to_q.weight": "output_blocks.10.1.transformer_blocks.0.attn_mem.to_q.weight",
        "up_blocks.2.attentions.0.norm_mem.bias": "output_blocks.6.1.transformer_blocks.0.norm2_mem.bias",
        "mid_block.attentions.0.linear_cat.weight": "middle_block.1.transformer_blocks.0.linear_cat.weight",
        "up_blocks.1.attentions.1.attn_mem.to_out.0.bias": "output_blocks.4.1.transformer_blocks.0.attn_mem.to_out.0.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours].to(torch.float16), original["diffusion_model." + theirs])

    adapters = load_adapters(tmp_path / "adapter", resolve_preset(build_unet("sd21"), "default"))
    assert sum(p.numel() for a in adapters.values() for p in a.parameters()) == 25_207_040


def _convert(state, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    return convert_original_checkpoint(path, tmp_path / "out")


def test_unknown_keys_are_reported_by_name(tmp_path):
    state = original_state_dict()
    state["diffusion_model.middle_block.1.transformer_blocks.0.attn_mem.to_z.weight"] = torch.zeros(2)
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2)
    with pytest.raises(AdapterWeightsError, match=r"(?s)attn_mem\.to_z\.weight.*first_stage_model\.encoder\.conv_in\.weight"):
        _convert(state, tmp_path)


def test_missing_and_misshapen_keys_are_reported_by_name(tmp_path):
    state = original_state_dict()
    del state["diffusion_model.output_blocks.8.1.transformer_blocks.0.attn_mem.to_k.weight"]
    state["diffusion_model.output_blocks.10.1.transformer_blocks.0.linear_cat.weight"] = torch.zeros(320, 320)
    with pytest.raises(AdapterWeightsError) as error:
        _convert(state, tmp_path)
    message = str(error.value)
    assert "missing tensor up_blocks.2.attentions.2.attn_mem.to_k.weight (640, 640)" in message
    assert "misshapen tensor up_blocks.3.attentions.1.linear_cat.weight: (320, 320), expected (320, 640)" in message


def test_a_layer_set_that_is_no_preset_is_refused(tmp_path):
    state = {k: v for k, v in original_state_dict().items() if "output_blocks.10.1" not in k}
    with pytest.raises(AdapterWeightsError, match="no known layer preset"):
        _convert(state, tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(AdapterWeightsError, match="weights_only=True"):
        convert_original_checkpoint(path, tmp_path / "out")
    assert "this must never run" not in capsys.readouterr().out


def test_cli_converts(checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["convert-checkpoint", str(checkpoint), str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert "converted 5 layers (preset 'default')" in result.output
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file()


def test_cli_reports_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["convert-checkpoint", str(tmp_path / "nope.pt"), str(tmp_path / "a")])
    assert result.exit_code == 1 and "nope.pt not found" in result.output


def test_a_models_recommended_settings_round_trip_and_are_checked(tmp_path):
    from dreamcache.core.weights import AdapterConfig, Recommended, save_adapters
    from dreamcache.core.adapter import DreamCacheAdapter

    from tests.helpers import make_tiny_pipeline

    layers = resolve_preset(make_tiny_pipeline().unet, "default")
    adapters = {layer.name: DreamCacheAdapter.for_layer(layer) for layer in layers}
    config = AdapterConfig.for_layers("default", layers)
    assert config.recommended == Recommended(steps=50, images_per_prompt=2, image_scale=0.35)  # the authors'
    mine = AdapterConfig("default", config.layers, recommended=Recommended(steps=20, images_per_prompt=1,
                                                                          image_scale=5.0))
    save_adapters(tmp_path, adapters, mine)
    assert read_adapter_config(tmp_path).recommended == Recommended(20, 1, 5.0)
    (tmp_path / "adapter_config.json").write_text(
        (tmp_path / "adapter_config.json").read_text().replace('"steps": 20', '"steps": 0'))
    with pytest.raises(AdapterWeightsError, match="steps 0 must be a positive integer"):
        read_adapter_config(tmp_path)


def test_the_bundled_model_recommends_its_measured_working_point():
    from dreamcache.app.config import BUNDLED_DIR

    recommended = read_adapter_config(BUNDLED_DIR / "adapter").recommended
    assert recommended.image_scale == 5.0 and recommended.steps >= 1  # measured: docs/toy-world.md


def test_a_callers_settings_win_and_the_rest_are_the_models():
    from dataclasses import replace

    from dreamcache.core.weights import Recommended

    model = Recommended(steps=10, images_per_prompt=1, image_scale=5.0, text_scale=4.0, sampler="ddim", eta=0.3,
                        negative_prompt="blurred", reference_mode="stretch", latent="sample")
    assert model.resolve() == model
    assert model.resolve(steps=20, image_scale=0.0, text_scale=7.5, negative_prompt="", latent="mode") == replace(
        model, steps=20, image_scale=0.0, text_scale=7.5, negative_prompt="", latent="mode")  # 0 and "" are values
    assert model.resolve(eta=0.0) == replace(model, eta=0.0)
    # The model's eta is its sampler's: another sampler, given no eta, samples deterministically.
    assert model.resolve(sampler="unipc") == replace(model, sampler="unipc", eta=0.0)
    assert model.resolve(sampler="ddim") == replace(model, eta=0.0)
    with pytest.raises(ValueError, match="eta 0.3 applies to ddim only, not 'unipc'"):
        model.resolve(sampler="unipc", eta=0.3)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        model.resolve(sampler="lms")
    with pytest.raises(ValueError, match="steps 0 must be a positive integer"):
        model.resolve(steps=0)
