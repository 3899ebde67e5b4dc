"""A generation task writes one batch while it denoises the next: the GPU does not wait for the object store.

The fault injected: an object store whose uploads are slow (0.4 s each, as a distant S3 can be).
"""

import threading
import time

from flows.runs.catalogue import TASK_BATCHES, run_embedded
from flows.platform.params import CatalogueRunParams
from flows.platform.resources import get_platform


def test_the_next_batch_is_denoised_while_the_last_one_is_written(platform_env, catalogue, monkeypatch):
    platform = get_platform()
    platform.load("pipeline")
    events = []  # (what, thread, start, end)
    pipe_class = type(platform.pipeline)
    real_call, real_put = pipe_class.__call__, type(platform.objects).put

    def timed_call(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real_call(self, *args, **kwargs)
        finally:
            events.append(("denoise", threading.current_thread().name, start, time.perf_counter()))

    def slow_put(self, key, *args, **kwargs):
        shot = key.startswith("shots/") and "contact_sheet" not in key  # a shot or its sidecar, not a sheet
        start = time.perf_counter()
        if shot:
            time.sleep(0.4)
        try:
            return real_put(self, key, *args, **kwargs)
        finally:
            if shot:
                events.append(("write", threading.current_thread().name, start, time.perf_counter()))

    monkeypatch.setattr(pipe_class, "__call__", timed_call)
    monkeypatch.setattr(type(platform.objects), "put", slow_put)
    summary = run_embedded(CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a beach"],
                                              images_per_prompt=2, steps=2, batch_size=2), progress=False)
    assert summary["status"] == "completed" and summary["images_generated"] == 6

    denoised = [e for e in events if e[0] == "denoise"]
    writes = [e for e in events if e[0] == "write"]
    assert len(denoised) == 3 and TASK_BATCHES >= 3  # one task of three batches of two
    assert {e[1] for e in writes} == {"shot-writer_0"} and all(e[1] != "shot-writer_0" for e in denoised)
    # Batch 2 was denoised while batch 1's shots were still being written, and batch 3 while batch 2's were.
    for k in (1, 2):
        start, end = denoised[k][2], denoised[k][3]
        assert any(w[2] < end and w[3] > start for w in writes), (k, events)
