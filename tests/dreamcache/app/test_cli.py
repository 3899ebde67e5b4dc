import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from dreamcache.app.cli import app

runner = CliRunner()


@pytest.mark.parametrize("architecture", ["sd15", "sd21"])
def test_inspect_reports_the_released_adapter(architecture):
    result = runner.invoke(app, ["inspect", "--architecture", architecture, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["adapter_parameters"] == 25_207_040
    assert report["cache_values"] == 3_031_040 and report["cache_bytes"] == 6_062_080
    assert [(layer["name"], layer["tokens"], layer["channels"]) for layer in report["layers"]] == [
        ("mid_block.attentions.0", 64, 1280), ("up_blocks.1.attentions.1", 256, 1280),
        ("up_blocks.2.attentions.0", 1024, 640), ("up_blocks.2.attentions.2", 1024, 640),
        ("up_blocks.3.attentions.1", 4096, 320),
    ]


def test_inspect_text_and_resolution():
    result = runner.invoke(app, ["inspect", "--architecture", "sd15", "--resolution", "768", "--preset", "middle"])
    assert result.exit_code == 0, result.output
    assert "adapter parameters: 9,835,520" in result.output
    assert "144 x 1280" in result.output  # 768 / 8 / 8 = 12, 12 * 12 = 144


def test_inspect_reads_only_the_unet_config_of_a_base(tmp_path):
    from tests.helpers import make_tiny_pipeline

    make_tiny_pipeline().unet.save_config(tmp_path / "base" / "unet")
    result = runner.invoke(app, ["inspect", "--base", str(tmp_path / "base"), "--json"])
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.output)["layers"]] == [
        "mid_block.attentions.0", "up_blocks.1.attentions.1", "up_blocks.2.attentions.1"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --architecture or --base"),
        (["--architecture", "sd3"], "unknown architecture 'sd3'"),
        (["--architecture", "sd15", "--preset", "most"], "unknown layer preset 'most'"),
        (["--base", "/nonexistent/model"], "no UNet config under /nonexistent/model"),
    ],
)
def test_inspect_errors(args, message):
    result = runner.invoke(app, ["inspect", *args])
    assert result.exit_code == 1 and message in result.output


def test_demo_writes_shots_their_text_only_twins_and_a_contact_sheet(tmp_path, monkeypatch):
    import numpy as np

    from dreamcache.perception.contact_sheet import PAIRS_PER_ROW, TILE

    for name in ("DREAMCACHE_CONFIG", "DREAMCACHE_BASE_MODEL", "DREAMCACHE_ADAPTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DREAMCACHE_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["demo", "--steps", "2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "home" / "outputs" / "demo"
    shots = [out / f"shot-{i:02d}.png" for i in range(3)]
    twins = [out / f"shot-{i:02d}.text-only.png" for i in range(3)]
    assert all(Image.open(p).size == (128, 128) for p in shots + twins)  # the bundled product-world model's size
    assert all(np.abs(np.asarray(Image.open(s), dtype=int) - np.asarray(Image.open(t), dtype=int)).mean() > 1
               for s, t in zip(shots, twins)), "a personalised shot equals its text-only twin: the cache did nothing"
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == (1 + 2 * PAIRS_PER_ROW) * TILE  # the reference, then three [text only | personalised]
    assert f"contact sheet: {out / 'contact_sheet.png'}" in result.output
    assert "model: bundled:product-world" in result.output
    assert not (tmp_path / "home" / "models").exists(), "the bundled model is read in place, never copied"


def test_demo_names_a_missing_bundled_model(tmp_path, monkeypatch):
    from dreamcache.app import config
    for name in ("DREAMCACHE_CONFIG", "DREAMCACHE_BASE_MODEL", "DREAMCACHE_ADAPTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DREAMCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(config, "BUNDLED_DIR", tmp_path / "broken-install")
    result = runner.invoke(app, ["demo", "--steps", "2"])
    assert result.exit_code == 1
    assert "bundled model's base/ is incomplete" in result.output and "model_index.json is missing" in result.output


def test_segment_writes_masks_and_reports_rejections(tmp_path, monkeypatch):
    from tests.helpers import scene

    monkeypatch.delenv("DREAMCACHE_SAM_CHECKPOINT", raising=False)
    # Another base than the bundled one: the border-colour segmenter (the world's own is for world scenes).
    monkeypatch.setenv("DREAMCACHE_BASE_MODEL", str(tmp_path))
    good = tmp_path / "mug.png"
    scene(background=(240, 240, 240))[0].save(good)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(blank)
    result = runner.invoke(app, ["segment", str(good), str(blank), "--output", str(tmp_path / "out"),
                                 "--resolution", "64"])
    assert result.exit_code == 0, result.output
    assert "1 segmented, 1 rejected" in result.output and f"{blank}: mask is blank" in result.output
    assert Image.open(tmp_path / "out" / "mug.subject.png").size == (64, 64)
    assert (tmp_path / "out" / "mug.mask.png").is_file()


def test_score_prints_every_metric(tmp_path, monkeypatch):
    from tests.helpers import save_tiny_scorers, scene

    clip, dino = save_tiny_scorers(tmp_path / "scorers")
    monkeypatch.setenv("DREAMCACHE_CLIP_MODEL", clip)
    monkeypatch.setenv("DREAMCACHE_DINO_MODEL", dino)
    image = tmp_path / "shot.png"
    scene(background=(240, 240, 240))[0].save(image)
    result = runner.invoke(app, ["score", str(image), str(image), "--prompt", "a mug", "--category", "mug", "--json"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.output.strip().splitlines()[-1])
    assert set(values) == {"clip_i", "clip_t", "dino", "mclip_i", "mdino"} and values["dino"] == pytest.approx(1.0)
