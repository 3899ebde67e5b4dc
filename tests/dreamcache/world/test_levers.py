"""The training speed levers (compile, channels-last, fused AdamW) change how the UNet stage runs, not
what it learns: a few steps with every lever give the same loss and weights as eager ones. The levers
apply on CUDA only; here they are forced on for the CPU so that the compiled path is checked where CI
runs (issue 31: "exactness of the compiled paths against eager on CPU at small shapes")."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel

from dreamcache.world import model as world_model
from dreamcache.world.model import Processes, WorldModelConfig, text_encoder_of
from dreamcache.world.pool import render_pool
from tests.dreamcache.world.conftest import TINY


def _train_unet(folder: Path, levers: str) -> tuple[torch.nn.Module, dict]:
    config = replace(TINY, init_from=str(folder), unet_steps=3, levers=levers)
    p = Processes(Accelerator(cpu=True))
    pool = render_pool(config.pool_size, config.seed, 0, resolution=config.resolution)
    vae = AutoencoderKL.from_pretrained(folder / "base" / "vae").float()
    text_encoder = text_encoder_of(CLIPModel.from_pretrained(folder / "clip").float())
    # ema_decay 0: the returned weights are the trained ones, not an average that hides the steps.
    return world_model.train_unet(pool, config, vae, text_encoder, p, ema_decay=0.0)


def _two_level_world(folder: Path, tmp_path: Path) -> Path:
    """The tiny world with a two-level UNet that has one of each block the shipped UNet has (cross-attention
    down and up, plain down and up, the middle one). Compiling is nearly all of this test's time on a cold
    inductor cache, and it grows with the number of blocks, not with their kinds: alone, on one thread, the
    test took 233 s with the four-level UNet and 85 s with this one, which leaves out no part of the stage."""
    small = tmp_path / "world"
    shutil.copytree(folder, small)
    shutil.rmtree(small / "base" / "unet")
    config = UNet2DConditionModel.load_config(folder / "base" / "unet")  # the shipped architecture, fewer levels
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({
        **config, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1,
        "block_out_channels": config["block_out_channels"][:2], "attention_head_dim": config["attention_head_dim"][:2]})
    unet.save_pretrained(small / "base" / "unet")
    return small


@pytest.fixture
def levers_on_cpu(monkeypatch):
    monkeypatch.setattr(WorldModelConfig, "levers_on", lambda self, device: self.lever_names())
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_compiled_channels_last_fused_unet_stage_trains_as_eager(tiny_world, levers_on_cpu, tmp_path):
    folder = _two_level_world(tiny_world[0], tmp_path)
    eager, eager_summary = _train_unet(folder, "none")
    fast, fast_summary = _train_unet(folder, "compile,channels-last,fused-adamw")
    assert fast_summary["steps"] == eager_summary["steps"] == 3
    assert fast_summary["first_loss"] == pytest.approx(eager_summary["first_loss"], rel=1e-5, abs=1e-6)
    assert fast_summary["final_loss"] == pytest.approx(eager_summary["final_loss"], rel=1e-4, abs=1e-6)
    # Weights are compared through what they compute: Adam's first steps turn the rounding noise in the
    # gradient of a bias that a GroupNorm cancels (mathematically zero) into full-size steps of either sign.
    start = world_model.UNet2DConditionModel.from_pretrained(folder / "base" / "unet")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, start.config.in_channels, 16, 16, generator=g)
    t = torch.tensor([10, 300, 600, 900])
    text = torch.randn(4, 7, start.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        before, after_eager, after_fast = (m(x, t, encoder_hidden_states=text).sample for m in (start, eager, fast))
    moved, gap = (after_eager - before).abs().max().item(), (after_fast - after_eager).abs().max().item()
    assert moved > 1e-3  # the steps changed what the UNet computes: the comparison is not of two untouched copies
    assert gap < 1e-3 * moved, f"the levers' UNet computes {gap:.2e} away from eager's (the steps moved it {moved:.2e})"
    assert all(p.is_contiguous() for p in fast.parameters())  # saved as eager saves
