import dataclasses

import pytest
import torch

from dreamcache.core.cache import FeatureCache, model_fingerprint
from dreamcache.core.errors import CacheError
from tests.helpers import TEST_RESOLUTION, make_tiny_pipeline, product_image


def test_cache_holds_each_layers_input_tokens(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    for layer in tiny_pipe.dreamcache_layers:
        assert cache.tensors[layer.name].shape == (layer.tokens(TEST_RESOLUTION, vae_scale=2), layer.channels)
    meta = cache.metadata
    assert (meta.timestep, meta.resolution, meta.preset, meta.references) == (1, TEST_RESOLUTION, "default", 1)
    assert meta.layers == tuple(layer.name for layer in tiny_pipe.dreamcache_layers)


def test_cache_is_the_transformer_input_of_the_base_unet(tiny_pipe):
    """Recorded tokens equal the transformer's input in a plain forward at t = 1 (adapters inactive)."""
    seen = {}
    target = tiny_pipe.unet.get_submodule("mid_block.attentions.0")
    handle = target.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    cache = tiny_pipe.cache_subject(product_image(), seed=5)
    handle.remove()
    b, c, h, w = seen["x"].shape
    assert torch.equal(cache.tensors["mid_block.attentions.0"], seen["x"].permute(0, 2, 3, 1).reshape(h * w, c))


def test_batched_caching_equals_one_at_a_time(tiny_pipe):
    images = [product_image((200, 30, 40)), product_image((30, 200, 40), shape="box"), product_image((30, 40, 200))]
    batched = tiny_pipe.cache_subjects(images, batch_size=3)
    for image, cache in zip(images, batched):
        alone = tiny_pipe.cache_subject(image)
        for name in alone.tensors:
            torch.testing.assert_close(cache.tensors[name], alone.tensors[name], atol=1e-5, rtol=1e-4)


def test_several_references_concatenate_along_tokens(tiny_pipe):
    a, b = product_image((200, 30, 40)), product_image((30, 40, 200), shape="box")
    both = tiny_pipe.cache_subject([a, b])
    first, second = tiny_pipe.cache_subjects([a, b])
    assert both.metadata.references == 2
    for name, tokens in both.tensors.items():
        # The second reference's noise comes from seed + 1.
        second_alone = tiny_pipe.cache_subject(b, seed=1).tensors[name]
        n = first.tensors[name].shape[0]
        torch.testing.assert_close(tokens[:n], first.tensors[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(tokens[n:], second_alone, atol=1e-5, rtol=1e-4)


def test_round_trip_through_safetensors(tiny_pipe, tmp_path):
    cache = tiny_pipe.cache_subject(product_image())
    path = cache.save(tmp_path / "subject.safetensors")
    loaded = FeatureCache.load(path)
    assert loaded.metadata == cache.metadata
    assert loaded.content_hash == cache.content_hash
    for name, tensor in cache.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)
    data = path.read_bytes()  # safetensors: an 8-byte header length, then a JSON header; no pickle
    assert data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def test_a_flipped_byte_is_detected(tiny_pipe, tmp_path):
    path = tiny_pipe.cache_subject(product_image()).save(tmp_path / "subject.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{path}.*corrupt"):
        FeatureCache.load(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_unreadable_caches_are_named(tiny_pipe, tmp_path, damage):
    path = tiny_pipe.cache_subject(product_image()).save(tmp_path / "subject.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-500])
    elif damage == "garbage":
        path.write_bytes(b"<html>not a cache</html>")
    else:
        path.unlink()
    with pytest.raises(CacheError, match=str(path)):
        FeatureCache.load(path)


def test_a_cache_from_another_base_model_is_refused(tiny_pipe):
    other = make_tiny_pipeline(seed=7)
    other.load_dreamcache()
    foreign = other.cache_subject(product_image())
    with pytest.raises(CacheError, match="made for base model.*cache the subject again"):
        tiny_pipe("a mug", subject=foreign, num_inference_steps=1)


def test_a_cache_for_another_preset_is_refused(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    tiny_pipe.unload_dreamcache()
    tiny_pipe.load_dreamcache(preset="middle")
    with pytest.raises(CacheError, match="preset 'default'"):
        tiny_pipe("a mug", subject=cache, num_inference_steps=1)


def test_metadata_is_part_of_the_hash(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    relabelled = FeatureCache(cache.tensors, dataclasses.replace(cache.metadata, timestep=150))
    assert relabelled.content_hash != cache.content_hash


def test_a_cache_of_another_format_is_refused(tiny_pipe):
    cache = tiny_pipe.cache_subject(product_image())
    future = FeatureCache(cache.tensors, dataclasses.replace(cache.metadata, format="dreamcache.feature-cache/2"))
    with pytest.raises(CacheError, match="format 'dreamcache.feature-cache/2'.*cache the subject again"):
        FeatureCache.from_bytes(future.to_bytes(), source="mug.safetensors")
    assert FeatureCache.from_bytes(cache.to_bytes()).content_hash == cache.content_hash


def test_fingerprint_is_dtype_stable_and_tells_models_apart():
    a, b = make_tiny_pipeline(seed=0), make_tiny_pipeline(seed=1)
    assert model_fingerprint(a.unet) == model_fingerprint(a.unet.to(torch.float16))
    assert model_fingerprint(a.unet) != model_fingerprint(b.unet)


def test_a_cache_has_the_same_bytes_in_every_process(tiny_pipe, tmp_path):
    # safetensors orders its metadata map differently per process: one process's bytes against another's.
    import subprocess
    import sys

    cache = tiny_pipe.cache_subject(product_image())
    cache.save(tmp_path / "here.safetensors")
    code = ("import sys; from dreamcache.core.cache import FeatureCache; "
            "FeatureCache.load(sys.argv[1]).save(sys.argv[2])")
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "here.safetensors"),
                        str(tmp_path / f"{name}.safetensors")], check=True)
    written = {(tmp_path / f"{name}.safetensors").read_bytes() for name in ("here", "a", "b", "c")}
    assert len(written) == 1


def test_caches_of_the_first_layout_still_load(tiny_pipe):
    from safetensors.torch import save

    cache = tiny_pipe.cache_subject(product_image())
    old = save({k: v.contiguous() for k, v in cache.tensors.items()},
               metadata={"dreamcache": cache.metadata.to_json(), "content_sha256": cache.content_hash})
    assert FeatureCache.from_bytes(old).content_hash == cache.content_hash


def test_a_cache_that_cannot_be_written_leaves_no_partial_file(tiny_pipe, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    cache = tiny_pipe.cache_subject(product_image())

    def full_disk(path, data):  # an injected fault: part of the bytes land, then the disk is full
        with open(path, "wb") as file:
            file.write(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cache.save(tmp_path / "caches" / "subject.safetensors")
    assert list((tmp_path / "caches").iterdir()) == []
