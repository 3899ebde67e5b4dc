import dataclasses
import itertools
import os
import shutil
from pathlib import Path

import pytest
import torch

from db import migrate
from dreamcache.core.architectures import build_unet
from tests.helpers import make_tiny_pipeline
from tests.servers import PostgresServer


def pytest_configure(config):
    """Each of pytest-xdist's workers gets its share of the cores for torch's (OpenMP) threads, and so do the
    processes its tests start (`dreamcache run`, workers). Oversubscribed, the threads spin-wait on each other:
    a tiny pipeline's step took 40 times longer with 2 workers x 2 threads on the 2-core CI machine (15 s
    instead of 0.4 s). An OMP_NUM_THREADS set by the caller wins."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and config.getoption("numprocesses", None):
        return  # the controller: it runs no test, and its workers inherit its environment
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    _scalar_inductor_kernels()


def _scalar_inductor_kernels() -> None:
    """Inductor's CPU kernels without SIMD code, here and in the processes the tests start. The compiled-path
    checks (test_levers, test_denoiser) hold inductor's graph rewriting (fusion, layouts, the compiled
    backward) to eager; its C++ vector code is the CPU backend's own, which no worker runs by default
    (GPUs get Triton; on CPU, FastPaths.for_device leaves compile off). Scalar kernels compile a third
    faster, and compiling is nearly all those checks' time on CI's cold cache: alone, test_levers took
    58 s instead of 85 and the compiled halves 77 s instead of 105 (BENCHMARKS.md, issue 34)."""
    os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
    import torch._inductor.config as inductor  # read once, at import: set the live value as well

    inductor.cpp.vec_isa_ok = os.environ["TORCHINDUCTOR_VEC_ISA_OK"] == "1"


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline with freshly initialised default adapters (fp32, CPU)."""
    pipe = make_tiny_pipeline()
    torch.manual_seed(1)
    pipe.load_dreamcache(preset="default")
    return pipe


@pytest.fixture(scope="session")
def sd15_unet():
    return build_unet("sd15")


@pytest.fixture(scope="session")
def sd21_unet():
    return build_unet("sd21")


# --- layers ---------------------------------------------------------------------------------
# Every test is `unit` or `e2e`, told by what it uses; `slow` ones are the benchmark smoke runs, the tests of
# the session's trained tiny world and the heaviest unit tests (marked `slow` in their files or below). `make test-fast`: -m "unit and not slow".

# A real server, or the platform itself (an embedded or served catalogue run): end to end.
_E2E_FIXTURES = {"postgres_server", "postgres_url", "s3_endpoint", "s3_bucket", "prefect_server",
                 "prefect_server_on_sqlite", "prefect_server_on_postgres", "platform_env"}
_ROOT = Path(__file__).parent
# Unit tests that run a pipeline, a trainer or a step loop many times over (tens of seconds each on the 2-core
# machine, measured with --durations): still in `make test`, left out of `make test-fast`.
_SLOW_MODULES = {"dreamcache/core/test_authors_inference.py", "dreamcache/core/test_step_reuse.py",
                 "dreamcache/core/test_placement.py", "dreamcache/core/test_denoiser.py",
                 "dreamcache/training/test_trainer.py", "dreamcache/world/test_shipped_model.py",
                 "dreamcache/world/test_pool.py", "dreamcache/world/test_classifier.py",
                 "dreamcache/world/test_segmenter.py"}
_SLOW_TESTS = {"test_a_cache_has_the_same_bytes_in_every_process",
               "test_demo_writes_shots_their_text_only_twins_and_a_contact_sheet",
               "test_each_image_depends_only_on_its_own_prompt_subject_and_seed",
               "test_the_default_size_is_the_square_of_the_resolution", "test_same_seed_same_image_other_seed_other_image",
               "test_loaded_adapters_bring_their_recommended_settings_and_a_given_value_wins",
               "test_text_only_is_exactly_diffusers_classifier_free_guidance", "test_eval_writes_a_complete_table"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        bench = item.path.is_relative_to(_ROOT / "bench")  # whole benchmarks, their catalogue runs included
        module = item.path.relative_to(_ROOT).as_posix() if item.path.is_relative_to(_ROOT) else ""
        e2e = (bench or module == "flows/test_stack.py"  # starts the stack's real servers itself
               or bool(_E2E_FIXTURES & set(item.fixturenames)) or params.get("database_url") == "postgres")
        item.add_marker(pytest.mark.e2e if e2e else pytest.mark.unit)
        if bench or module in _SLOW_MODULES or item.originalname in _SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if "tiny_world" in item.fixturenames:
            # One worker trains the tiny world (a session fixture) and runs every test of it, rather than each.
            item.add_marker(pytest.mark.slow)
            _xdist_group(item, "tiny_world")
        elif any(defs[-1].scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values() if defs):
            _xdist_group(item, module)  # its module's fixture is built once, on one worker, rather than on each
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def _xdist_group(item: pytest.Item, name: str) -> None:
    """Sends the item to the one worker that runs its group (`--dist loadgroup`).

    pytest-xdist 3.8 (the newest release) names an item's group by appending "@name" to `item._nodeid`,
    which pytest 9 no longer reads: its id lives in `item._id`. The groups were silently ignored, and each
    worker trained its own tiny world. The suffix is written where pytest reads it."""
    item.add_marker(pytest.mark.xdist_group(name))
    node_id = getattr(item, "_id", None)
    if item.config.getoption("loadgroup", False) and node_id is not None:  # tests/test_scheduling.py checks it
        last = node_id.names[-1] + ("" if node_id.params is None else f"[{node_id.params}]")
        item._id = dataclasses.replace(node_id, names=(*node_id.names[:-1], f"{last}@{name}"), params=None)


# --- databases --------------------------------------------------------------------------------

_upgrade = migrate.upgrade


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """A SQLite database migrated to head once per session: the template of every new one."""
    path = tmp_path_factory.mktemp("template") / "migrated.db"
    _upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(autouse=True)
def new_sqlite_databases_from_the_template(request, monkeypatch, migrated_sqlite):
    """A new SQLite database migrated to head starts as a copy of the session's template, then migrates
    as usual (to nothing): the same schema, without replaying every migration in each of the suite's ~70
    embedded runs (about 3 s each on the CI machine). Tests marked `fresh_migrations` replay them."""
    if request.node.get_closest_marker("fresh_migrations"):
        return

    def upgrade(url: str, revision: str = "head") -> None:
        path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
        if revision == "head" and path is not None and path.parent.is_dir() and (
                not path.exists() or path.stat().st_size == 0):
            shutil.copyfile(migrated_sqlite, path)
        _upgrade(url, revision)

    monkeypatch.setattr(migrate, "upgrade", upgrade)


# --- real servers ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer().start()
    yield server
    server.destroy()


_database_names = itertools.count()


@pytest.fixture
def postgres_url(postgres_server):
    """An empty database of its own on the suite's PostgreSQL server."""
    return postgres_server.create_database(f"test_{os.getpid()}_{next(_database_names)}")


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'dreamcache.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request):
    """An empty database, once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server over real HTTP, with test credentials in the environment."""
    from tests.servers import S3_CREDENTIALS, S3Server

    with pytest.MonkeyPatch.context() as env:
        for name, value in S3_CREDENTIALS.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        server = S3Server().start()
        env.setenv("AWS_ENDPOINT_URL", server.endpoint)
        yield server.endpoint
        server.stop()


_buckets = itertools.count()


@pytest.fixture
def s3_bucket(s3_endpoint):
    import boto3

    name = f"dreamcache-test-{next(_buckets)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_server_on_sqlite(tmp_path_factory):
    """One real Prefect server for the session, on a free port, its database SQLite."""
    from tests.servers import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_server(prefect_server_on_sqlite):
    """The Prefect server of the tests that do not ask for one on PostgreSQL (tests/flows/test_ui.py asks for both)."""
    return prefect_server_on_sqlite


@pytest.fixture(scope="session")
def prefect_server_on_postgres(tmp_path_factory, postgres_server):
    """Another, its database on the suite's PostgreSQL (as the compose stack and docs/operations.md have it)."""
    from tests.servers import PrefectServer

    # Not "prefect": the compose init script (tests/infra/test_compose.py) creates that one on this server.
    database = postgres_server.create_database("prefect_ui_tests").replace("+psycopg:", "+asyncpg:")
    server = PrefectServer(tmp_path_factory.mktemp("prefect-pg"), database).start()
    yield server
    server.stop()
