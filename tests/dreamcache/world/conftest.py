import pytest

from dreamcache.world.model import WorldModelConfig, train_world_model

# The shipped architecture at a size CPU tests afford: 64 px, narrow models, a few steps per stage.
TINY = WorldModelConfig(resolution=64, unet_channels=8, vae_channels=16, pool_size=48, batch_size=8,
                        unet_batch_size=8, vae_steps=6, clip_steps=6, unet_steps=6, classifier_steps=6,
                        adapter_steps=2, middle_adapter_steps=2, adapter_batch_size=2, learning_rate=1e-3)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A world model directory trained for a few steps per stage on CPU (the layout the platform ships)."""
    folder = tmp_path_factory.mktemp("world")
    record = train_world_model(folder, TINY)
    return folder, record
