"""Errors that name the thing (docs/reliability.md, "Error catalogue"): a bad setting, config file, database or S3
object is one line naming it, with no traceback; permanent failures are not retried; a failed Prefect run says
the same one line as the CLI."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.stub import Stubber
from typer.testing import CliRunner

from db.objects import ObjectNotFound, S3Error, S3Store, s3_error
from dreamcache.app.config import SettingsError, load_settings
from flows.cli import app
from flows.platform.failures import is_permanent, one_line
from tests.flows.conftest import served  # noqa: F401  (the catalogue deployment, served in-process)

ROOT = Path(__file__).resolve().parents[2]


def dreamcache(*args: str) -> subprocess.CompletedProcess:
    """The `dreamcache` command in its own process, as a user runs it (its `main()`, not a test runner's)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# --- settings and config files -----------------------------------------------------------------------

@pytest.mark.parametrize("variable, value, expected", [
    ("DREAMCACHE_DTYPE", "float8",
     "error: DREAMCACHE_DTYPE: input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
    ("DREAMCACHE_LEASE_SECONDS", "0", "error: DREAMCACHE_LEASE_SECONDS: input should be greater than or equal to 5"),
    ("DREAMCACHE_BASE_MODEL", "/nonexistent", "error: DREAMCACHE_BASE_MODEL: folder /nonexistent does not exist"),
    ("DREAMCACHE_ADAPTER", "./no-such-adapter", "error: DREAMCACHE_ADAPTER: folder ./no-such-adapter does not exist"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(platform_env, variable, value, expected):
    platform_env.setenv(variable, value)
    result = dreamcache("history")
    assert result.returncode == 1
    assert only_line(result.stderr).startswith(expected), result.stderr


@pytest.mark.parametrize("variable, value, expected", [
    ("DREAMCACHE_DEVICE", "gpu-0", "error: DREAMCACHE_DEVICE: not a device: use auto, cpu, cuda or cuda:N"),
    ("DREAMCACHE_DATABASE_URL", "postgresql+psycopg://u:s3cret-pw@db:99999/dreamcache",
     "error: DREAMCACHE_DATABASE_URL: the URL's port is not a number from 1 to 65535"),
    ("DREAMCACHE_DATABASE_URL", "mysql://u:s3cret-pw@db/dreamcache",
     "error: DREAMCACHE_DATABASE_URL: the URL's scheme is neither sqlite:// nor postgresql+psycopg://"),
    ("DREAMCACHE_ALLOWED_SOURCES", "[1, 2]",
     "error: DREAMCACHE_ALLOWED_SOURCES: give the places as text: comma-separated, or a list of strings"),
    ("DREAMCACHE_LEASE_SECONDS", "99999999999", "error: DREAMCACHE_LEASE_SECONDS: input should be less than or equal"),
    ("DREAMCACHE_DEVIC", "s3cret-pw", "error: unknown setting DREAMCACHE_DEVIC (did you mean DREAMCACHE_DEVICE?); "
     "unset it"),
    ("DREAMCACHE_BOGUS", "s3cret-pw", "error: unknown setting DREAMCACHE_BOGUS ("),
])
def test_settings_that_failed_later_or_passed_in_silence_are_one_line_without_their_value(platform_env, variable,
                                                                                          value, expected):
    platform_env.setenv(variable, value)
    result = dreamcache("history")
    assert result.returncode == 1
    assert only_line(result.stderr).startswith(expected), result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_a_config_file_value_is_never_echoed(platform_env, tmp_path):
    config = tmp_path / "dreamcache.toml"
    config.write_text('dtype = "s3cret-pw"\nallowed_sources = [1, 2]\n')
    platform_env.setenv("DREAMCACHE_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "\n" not in str(caught.value) and "s3cret-pw" not in str(caught.value)
    assert f"config file {config} line 1: dtype" in str(caught.value)
    assert f"config file {config} line 2: allowed_sources: give the places as text" in str(caught.value)


def test_a_hub_id_is_not_taken_for_a_missing_folder(platform_env):
    platform_env.setenv("DREAMCACHE_BASE_MODEL", "stabilityai/stable-diffusion-2-1-base")
    assert load_settings().base_model == "stabilityai/stable-diffusion-2-1-base"


@pytest.mark.parametrize("text, expected", [
    ('device = "cpu"\nbase_modle = "x"\n', "config file {} line 2: unknown setting 'base_modle' (did you mean 'base_model'?)"),
    ('device = "cpu"\ndtype = \n', "config file {} line 2: invalid value (column 9)"),
    ('device = "cpu"\n\nlease_seconds = 0\n',
     "config file {} line 3: lease_seconds: input should be greater than or equal to 5"),
])
def test_a_config_file_error_names_the_file_and_line(platform_env, tmp_path, text, expected):
    config = tmp_path / "dreamcache.toml"
    config.write_text(text)
    platform_env.setenv("DREAMCACHE_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == expected.format(config)
    result = CliRunner().invoke(app, ["db", "current"])
    assert result.exit_code == 1 and result.output == f"error: {expected.format(config)}\n"


def test_a_missing_config_file_is_named(platform_env, tmp_path):
    platform_env.setenv("DREAMCACHE_CONFIG", str(tmp_path / "missing.toml"))
    result = CliRunner().invoke(app, ["history"])
    assert result.exit_code == 1 and result.output == f"error: DREAMCACHE_CONFIG: {tmp_path / 'missing.toml'} is not a file\n"


def test_the_platform_loads_its_settings_through_the_loader(platform_env):
    from flows.platform.resources import get_platform

    platform_env.setenv("DREAMCACHE_LEASE_SECONDS", "0")
    with pytest.raises(SettingsError, match="^DREAMCACHE_LEASE_SECONDS: "):
        get_platform()


# --- a damaged or unreachable database ----------------------------------------------------------------

@pytest.mark.parametrize("command", [["history"], ["db", "current"]])
def test_a_file_that_is_not_a_database_is_one_line(platform_env, tmp_path, command):
    damaged = tmp_path / "dreamcache.db"
    damaged.write_bytes(b"this is not a database " * 100)
    platform_env.setenv("DREAMCACHE_DATABASE_URL", f"sqlite:///{damaged}")
    result = dreamcache(*command)
    assert result.returncode == 1
    assert only_line(result.stderr) == f"error: database sqlite:///{damaged}: file is not a database"


@pytest.mark.parametrize("command", [["history"], ["db", "current"]])
def test_a_database_that_refuses_is_named_without_its_password(platform_env, postgres_server, command):
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{postgres_server.port}/nowhere"
    platform_env.setenv("DREAMCACHE_DATABASE_URL", url)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    line = only_line(result.output)
    assert line.startswith(f"error: database postgresql+psycopg://postgres:***@127.0.0.1:{postgres_server.port}"
                           "/nowhere: ") and 'database "nowhere" does not exist' in line
    assert "hunter2" not in result.output


# --- S3 -----------------------------------------------------------------------------------------------

def test_s3_errors_name_the_bucket_and_key_and_say_what_to_do(s3_bucket):
    missing_bucket = S3Store(f"s3://{s3_bucket}-gone/runs")
    with pytest.raises(S3Error) as caught:
        missing_bucket.get("shots/a.png")
    assert str(caught.value) == (f"download of s3://{s3_bucket}-gone/runs/shots/a.png failed: bucket "
                                 f"'{s3_bucket}-gone' does not exist (NoSuchBucket); check the bucket name")
    assert caught.value.code == "NoSuchBucket" and is_permanent(caught.value)
    with pytest.raises(S3Error, match=rf"^upload of s3://{s3_bucket}-gone/runs/b.png failed: .*NoSuchBucket\); check"):
        missing_bucket.put("b.png", b"x")
    with pytest.raises(S3Error, match=rf"^listing of s3://{s3_bucket}-gone/runs/shots/ failed: .*NoSuchBucket"):
        missing_bucket.sizes("shots/")

    store = S3Store(f"s3://{s3_bucket}/runs")
    with pytest.raises(ObjectNotFound) as missing:  # still what the steps catch for a missing object
        store.get("shots/none.png")
    assert str(missing.value) == f"s3://{s3_bucket}/runs/shots/none.png does not exist (NoSuchKey)"
    assert is_permanent(missing.value) and one_line(missing.value) == str(missing.value)


def test_access_denied_says_which_permission_is_missing():
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    store = S3Store("s3://catalogue/runs", client=client)
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", service_message="Access Denied",
                              http_status_code=403)
        with pytest.raises(S3Error) as caught:
            store.get("shots/a.png")
    assert str(caught.value) == ("download of s3://catalogue/runs/shots/a.png failed: access denied (AccessDenied); "
                                 "the worker's credentials lack s3:GetObject on arn:aws:s3:::catalogue/runs/shots/a.png")
    assert is_permanent(caught.value)


def test_sources_on_s3_name_the_bucket_and_key(s3_bucket):
    from flows.steps.source import list_source, read_uri

    with pytest.raises(S3Error, match=rf"^download of s3://{s3_bucket}/catalogue/none.png failed|"
                                      rf"^s3://{s3_bucket}/catalogue/none.png does not exist \(NoSuchKey\)$"):
        read_uri(f"s3://{s3_bucket}/catalogue/none.png")
    with pytest.raises(S3Error) as caught:
        read_uri(f"s3://{s3_bucket}-gone/catalogue/a.png")
    assert str(caught.value).startswith(f"download of s3://{s3_bucket}-gone/catalogue/a.png failed: bucket")
    with pytest.raises(S3Error) as caught:
        list_source(f"s3://{s3_bucket}-gone/catalogue/")
    assert str(caught.value) == (f"listing of s3://{s3_bucket}-gone/catalogue/ failed: bucket '{s3_bucket}-gone' "
                                 "does not exist (NoSuchBucket); check the bucket name")


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} happened"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc, permanent", [
    (s3_error(client_error("NoSuchKey", 404), "b", "k"), True),
    (s3_error(client_error("NoSuchBucket", 404), "b", "k"), True),
    (s3_error(client_error("AccessDenied", 403), "b", "k"), True),
    (s3_error(client_error("InvalidBucketName"), "b", "k"), True),
    (client_error("NoSuchBucket", 404), True),
    (ValueError("prompt 1 is empty"), True),
    (SettingsError("DREAMCACHE_DTYPE: ..."), True),
    (s3_error(client_error("SlowDown", 503), "b", "k"), False),
    (s3_error(client_error("InternalError", 500), "b", "k"), False),
    (s3_error(EndpointConnectionError(endpoint_url="http://s3"), "b", "k"), False),
    (client_error("SlowDown", 503), False),
    (ConnectionResetError("connection reset by peer"), False),
    (RuntimeError("database restarted"), False),
])
def test_permanent_and_transient_failures(exc, permanent):
    assert is_permanent(exc) is permanent
    assert "\n" not in one_line(exc)


def test_every_catalogue_task_retries_only_transient_failures():
    from prefect import Task

    from flows.runs import catalogue
    from flows.platform.failures import retry_unless_permanent

    tasks = [value for value in vars(catalogue).values() if isinstance(value, Task)]
    assert len(tasks) >= 6
    assert all(t.retries >= 1 and t.retry_condition_fn is retry_unless_permanent for t in tasks), tasks


@pytest.mark.parametrize("failure, attempts", [
    (s3_error(client_error("NoSuchBucket", 404), "catalogue", "products/a.png"), 1),
    (s3_error(client_error("AccessDenied", 403), "catalogue", "products/a.png"), 1),
    (ValueError("not an image"), 1),
    (s3_error(client_error("SlowDown", 503), "catalogue", "products/a.png"), 3),
])
def test_a_task_retries_a_transient_failure_and_not_a_permanent_one(prefect_server, monkeypatch, failure, attempts):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    from flows.runs import catalogue

    calls = []

    def segment(platform, run_id, subject_ids):
        calls.append(subject_ids)
        raise failure

    monkeypatch.setattr(catalogue.segment, "segment", segment)
    monkeypatch.setattr(catalogue, "get_platform", lambda: None)
    task = catalogue.segment_task.with_options(retry_delay_seconds=0)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        with pytest.raises(type(failure)):
            task(1, [1, 2])
    assert len(calls) == attempts


# --- a failed run on Prefect: one line, in the UI and the terminal ------------------------------------

def trigger(source: str):
    """A run of the served catalogue deployment, as the UI or a schedule starts one."""
    from prefect.deployments import run_deployment

    params = dict(source=source, prompts=["a {category} on a beach"], images_per_prompt=1, steps=2)
    return run_deployment("catalogue-run/catalogue", parameters={"params": params}, timeout=300, poll_interval=1)


async def state_and_logs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        for _ in range(30):  # the run's process sends its logs in batches; the last may still be on its way
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any("Finished in state" in log.message for log in logs):
                break
            await asyncio.sleep(1)
        return (await client.read_flow_run(flow_run_id)).state, logs


def test_a_failed_prefect_run_says_why_in_one_line_as_the_cli_does(served):
    gone = f"{served['bucket']}-gone"
    expected = (f"listing of s3://{gone}/catalogue/ failed: bucket '{gone}' does not exist (NoSuchBucket); "
                "check the bucket name")
    flow_run = trigger(f"s3://{gone}/catalogue/")
    state, logs = asyncio.run(state_and_logs(flow_run.id))
    assert state.is_failed() and state.message == expected, state
    assert not [log.message for log in logs if "Traceback" in log.message]

    result = CliRunner().invoke(app, ["run", "--prefect", "--source", f"s3://{gone}/catalogue/", "-p", "a {category}"])
    assert result.exit_code == 1 and f"error: {expected}\n" in result.output, result.output
    assert "Traceback" not in result.output


def test_an_input_error_on_prefect_is_one_line_without_a_traceback(served, tmp_path):
    (tmp_path / "empty").mkdir()
    flow_run = trigger(str(tmp_path / "empty"))
    state, logs = asyncio.run(state_and_logs(flow_run.id))
    assert state.is_failed() and "\n" not in state.message and str(tmp_path / "empty") in state.message, state
    assert "Traceback" not in state.message and not [log.message for log in logs if "Traceback" in log.message]


def test_a_refusal_inside_a_task_fails_the_run_at_once_without_a_traceback(served):
    """A documented refusal raised in a task (shots made already under another prefix) is not retried, leaves no
    traceback in the run's logs, and is the run's state message as it is (no class name before it)."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    def run(prefix: str):
        params = dict(source=f"s3://{served['bucket']}/catalogue/", prompts=["a {category} on a beach"],
                      images_per_prompt=1, steps=2, output_prefix=prefix)
        return run_deployment("catalogue-run/catalogue", parameters={"params": params}, timeout=300, poll_interval=1)

    assert run("first").state.is_completed()
    flow_run = run("second")
    state, logs = asyncio.run(state_and_logs(flow_run.id))
    assert state.is_failed() and state.message.startswith("3 of the 3 shots this run plans were made already, under "
                                                          "another output prefix"), state
    assert not [log.message for log in logs if "Traceback" in log.message or "Retry" in log.message]

    async def plan_runs():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        return [r for r in runs if r.name.startswith("plan_task")]

    (plan,) = asyncio.run(plan_runs())
    assert plan.state.is_failed() and plan.run_count == 1


def test_a_prefect_run_without_the_platform_stores_is_refused_naming_them(prefect_server, platform_env, catalogue,
                                                                           tmp_path):
    """A flow run under Prefect on the embedded defaults (a worker started without the platform's settings) fails
    in one line naming the missing settings, and writes nothing in its own home."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runs.catalogue import catalogue_run
    from flows.platform.params import CatalogueRunParams

    platform_env.setenv("PREFECT_API_URL", prefect_server.url)
    params = CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a beach"], steps=2)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        state = catalogue_run(params, return_state=True)
        assert state.is_failed() and "\n" not in state.message, state
        assert state.message.startswith("flow run catalogue-shots has no DREAMCACHE_DATABASE_URL and no "
                                        "DREAMCACHE_OBJECTS_URL: under Prefect"), state.message
        assert not (tmp_path / "home").exists()
        platform_env.setenv("DREAMCACHE_DATABASE_URL", f"sqlite:///{tmp_path / 'platform.db'}")
        state = catalogue_run(params, return_state=True)
        assert state.is_failed() and "has no DREAMCACHE_OBJECTS_URL: " in state.message, state.message


@pytest.mark.parametrize("database, expected", [
    ("postgresql+psycopg://postgres@127.0.0.1:{port}/nowhere",
     "error: database postgresql+psycopg://postgres@127.0.0.1:{port}/nowhere: "),
    (None, "error: dreamcache worker has no DREAMCACHE_DATABASE_URL: under Prefect"),
])
def test_a_worker_without_its_database_fails_at_start_in_one_line(prefect_server, postgres_server, platform_env,
                                                                  s3_bucket, database, expected):
    """`dreamcache worker` checks its database and object store before it subscribes: it never waits for work it
    could not record."""
    platform_env.setenv("PREFECT_API_URL", prefect_server.url)
    platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}/platform")
    if database:
        platform_env.setenv("DREAMCACHE_DATABASE_URL", database.format(port=postgres_server.port))
    result = dreamcache("worker")
    assert result.returncode == 1, result.stdout + result.stderr
    line = only_line(result.stderr)
    assert line.startswith(expected.format(port=postgres_server.port)), line
    assert "Subscribing" not in result.stdout + result.stderr


def test_a_worker_whose_bucket_is_missing_fails_at_start_in_one_line(prefect_server, platform_env, postgres_url,
                                                                     s3_bucket):
    platform_env.setenv("PREFECT_API_URL", prefect_server.url)
    platform_env.setenv("DREAMCACHE_DATABASE_URL", postgres_url)
    platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}-gone/platform")
    result = dreamcache("worker")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NoSuchBucket" in only_line(result.stderr) and f"{s3_bucket}-gone" in result.stderr


def test_a_prefect_server_that_does_not_answer_is_named_with_what_to_do(platform_env):
    platform_env.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    result = CliRunner().invoke(app, ["run", "-p", "a {category}", "--dry-run"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("error: the Prefect server at PREFECT_API_URL=http://127.0.0.1:9/api "
                                                     "does not answer (ConnectError): start it"), result.output
    assert "unset PREFECT_API_URL" in result.output and "Traceback" not in result.output
