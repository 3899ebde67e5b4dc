import pytest
import torch

from dreamcache import world_model


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A world model directory trained for a few steps per stage on CPU (the layout the platform ships)."""
    steps = world_model.StageSteps(pool_size=48, batch_size=8, unet_batch_size=8, vae_steps=6, clip_steps=6,
                                   unet_steps=6, classifier_steps=6, adapter_steps=2, adapter_batch_size=2,
                                   learning_rate=1e-3)
    folder = tmp_path_factory.mktemp("world")
    record = world_model.train_world_model(folder, steps, torch.device("cpu"))
    return folder, record
