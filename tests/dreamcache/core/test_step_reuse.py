"""Feature reuse across steps (issue 35): the deep path every N steps, the shallow path and the cache at every step."""

from collections import Counter

import pytest
import torch

from tests.helpers import product_image

PROMPTS = ("a red mug", "a blue lamp", "a box")


def _caches(pipe):
    return [pipe.cache_subject(product_image(c)) for c in ((220, 20, 20), (20, 20, 220))]


def _latents(pipe, interval, guidance="combined", sampler="ddim", steps=6, seeds=(5, 6, 7), batch_size=8,
             subjects=None, prompts=PROMPTS):
    subjects = subjects if subjects is not None else [c for c, _ in zip(_caches(pipe) * 2, prompts)]
    return pipe(list(prompts), subject=subjects, seed=list(seeds), guidance=guidance, sampler=sampler,
                num_inference_steps=steps, batch_size=batch_size, output_type="latent", progress=False,
                deep_reuse_interval=interval).images


@pytest.mark.parametrize("guidance", ["combined", "joint"])
@pytest.mark.parametrize("sampler", ["ddim", "unipc"])
def test_interval_one_is_exactly_the_plain_step(tiny_pipe, guidance, sampler):
    plain = _latents(tiny_pipe, None, guidance, sampler)
    assert torch.equal(_latents(tiny_pipe, 1, guidance, sampler), plain)
    tiny_pipe.disable_fast_paths()  # the unshared encoder: one encoder row per decoder row
    assert torch.equal(_latents(tiny_pipe, 1, guidance, sampler), _latents(tiny_pipe, None, guidance, sampler))


def _count_calls(pipe):
    unet, calls = pipe.unet, Counter()
    parts = {"first encoder block": unet.down_blocks[0], "second encoder block": unet.down_blocks[1],
             "middle block": unet.mid_block, "first decoder block": unet.up_blocks[0],
             "last decoder block": unet.up_blocks[-1], "conv_out": unet.conv_out}
    hooks = [m.register_forward_pre_hook(lambda module, args, name=name: calls.update([name]))
             for name, m in parts.items()]
    return calls, hooks


@pytest.mark.parametrize("interval, full_steps", [(2, 4), (3, 3), (7, 1)])
def test_the_shallow_path_runs_every_step_and_the_deep_path_every_n(tiny_pipe, interval, full_steps):
    caches = _caches(tiny_pipe)  # made before counting: caching runs the UNet too
    calls, hooks = _count_calls(tiny_pipe)
    try:
        _latents(tiny_pipe, interval, steps=7, batch_size=2, subjects=[caches[0], caches[1], caches[0]])  # 2 batches
    finally:
        for hook in hooks:
            hook.remove()
    batches = 2
    for shallow in ("first encoder block", "last decoder block", "conv_out"):
        assert calls[shallow] == 7 * batches, shallow
    for deep in ("second encoder block", "middle block", "first decoder block"):
        assert calls[deep] == full_steps * batches, deep  # steps 0, N, 2N, ... of each batch


def test_the_cache_is_injected_at_every_computed_step(tiny_pipe):
    """The adapter of the last decoder block (shallow path) attends to the cache at every step, those of the
    deep path at every full step; always on the cached rows only (combined guidance: image and text passes)."""
    adapters = tiny_pipe.dreamcache_adapters
    shallow = [name for name in adapters if name.startswith(f"up_blocks.{len(tiny_pipe.unet.up_blocks) - 1}.")]
    assert shallow and len(shallow) < len(adapters)  # the tiny UNet has adapters on both paths
    rows = {name: [] for name in adapters}
    hooks = [a.register_forward_pre_hook(lambda module, args, name=name: rows[name].append(args[0].shape[0]))
             for name, a in adapters.items()]
    caches = _caches(tiny_pipe)
    try:
        _latents(tiny_pipe, 3, steps=7, subjects=[caches[0], caches[1], caches[0]])
    finally:
        for hook in hooks:
            hook.remove()
    for name in adapters:
        expected = 7 if name in shallow else 3
        assert rows[name] == [2 * len(PROMPTS)] * expected, name  # 3 rows, each in the image and text passes


def test_each_row_reuses_its_own_deep_features(tiny_pipe):
    """Cached and uncached rows and the three passes keep their own deep features: a row's image is the same
    alone or beside others (to float rounding: batched matmuls differ by ~3e-5 on latents of size ~5 without reuse
    too), and another row's features would move it by far more (`test_reuse_changes_the_numbers...`)."""
    caches = _caches(tiny_pipe)
    together = _latents(tiny_pipe, 2, subjects=[caches[0], None, caches[1]])
    for i, subject in enumerate([caches[0], None, caches[1]]):
        alone = _latents(tiny_pipe, 2, subjects=[subject], prompts=PROMPTS[i:i + 1], seeds=[5 + i])
        assert torch.allclose(alone[0], together[i], atol=2e-4), i


@pytest.mark.parametrize("guidance", ["combined", "joint"])
@pytest.mark.parametrize("sampler", ["ddim", "unipc"])
def test_reuse_changes_the_numbers_but_keeps_the_picture(tiny_pipe, guidance, sampler):
    plain = _latents(tiny_pipe, None, guidance, sampler)
    reused = _latents(tiny_pipe, 2, guidance, sampler)
    other_seeds = _latents(tiny_pipe, None, guidance, sampler, seeds=(50, 60, 70))
    assert torch.isfinite(reused).all()
    change = (reused - plain).abs().mean()
    assert change > 0  # the shallow steps really reuse something
    assert change < 0.25 * (other_seeds - plain).abs().mean()  # far nearer its own plain image than another seed's


# The compiled halves with reuse: tests/dreamcache/core/test_denoiser.py, test_compiled_halves_match_eager_fp32.


@pytest.mark.parametrize("interval", [0, -2, 1.5, True, "2"])
def test_an_interval_that_is_not_a_whole_number_of_steps_is_refused(tiny_pipe, interval):
    with pytest.raises(ValueError, match=f"deep_reuse_interval {interval!r} must be a whole number of steps"):
        tiny_pipe("a mug", num_inference_steps=2, output_type="latent", progress=False, deep_reuse_interval=interval)
