import asyncio
import threading

import boto3
import pytest

from flows.platform import resources as platform_module
from tests.helpers import make_tiny_pipeline, scene


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny test pipeline and its adapters, saved like any base model and adapter."""
    root = tmp_path_factory.mktemp("model")
    pipe = make_tiny_pipeline()
    pipe.save_pretrained(root / "base")
    pipe.load_dreamcache()
    pipe.save_dreamcache(root / "adapter")
    return root


@pytest.fixture
def platform_env(tmp_path, monkeypatch, tiny_model):
    """Settings for one test: its own home; the tiny model; the database and objects set by the caller."""
    monkeypatch.setenv("DREAMCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DREAMCACHE_BASE_MODEL", str(tiny_model / "base"))
    monkeypatch.setenv("DREAMCACHE_ADAPTER", str(tiny_model / "adapter"))
    monkeypatch.setenv("DREAMCACHE_DEVICE", "cpu")
    for name in ("DREAMCACHE_DATABASE_URL", "DREAMCACHE_OBJECTS_URL", "DREAMCACHE_CLIP_MODEL", "DREAMCACHE_DINO_MODEL",
                 "DREAMCACHE_SAM_CHECKPOINT", "DREAMCACHE_CONFIG", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    platform_module.close_platforms()
    yield monkeypatch
    platform_module.close_platforms()


PRODUCTS = {"mug/MUG-1": (200, 30, 40), "mug/MUG-2": (30, 60, 200), "lamp/LAMP-1": (240, 200, 60)}


@pytest.fixture
def catalogue(tmp_path):
    """Three good products in category folders, and two bad files."""
    root = tmp_path / "catalogue"
    for name, color in PRODUCTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        scene(product_color=color, background=(250, 250, 250), size=(96, 96), box=(20, 16, 76, 80))[0].save(
            root / f"{name}.png")
    (root / "mug" / "BROKEN.png").write_bytes((root / "mug" / "MUG-1.png").read_bytes()[:150])
    (root / "lamp" / "NOT-AN-IMAGE.jpg").write_text("<html>404</html>")
    return root


@pytest.fixture
def prefect_env(prefect_server, platform_env, postgres_url, s3_bucket, catalogue):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    platform_env.setenv("PREFECT_API_URL", prefect_server.url)
    platform_env.setenv("PREFECT_HOME", str(prefect_server.home))
    platform_env.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "1")
    platform_env.setenv("DREAMCACHE_DATABASE_URL", postgres_url)
    platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}/platform")
    s3 = boto3.client("s3")
    for path in sorted(catalogue.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"catalogue/{path.relative_to(catalogue).as_posix()}")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        yield dict(bucket=s3_bucket, database=postgres_url)


@pytest.fixture
def served(prefect_env):
    """The catalogue deployment served by an in-process runner, as `prefect deploy` + a worker would."""
    from prefect.runner import Runner

    from flows.runs.catalogue import catalogue_run

    runner = Runner(name="test-runner", query_seconds=1)
    loop = asyncio.new_event_loop()  # the runner lives on its own loop, in a thread
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(runner.aadd_flow(catalogue_run, name="catalogue"), loop).result(60)
    started = asyncio.run_coroutine_threadsafe(runner.start(), loop)
    yield prefect_env
    asyncio.run_coroutine_threadsafe(runner.astop(), loop).result(60)
    started.result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


