"""prefect.yaml registers on a real Prefect server with its schedule, work pool and limits."""

import asyncio
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_deploys(prefect_server, monkeypatch):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    module, _, name = deployment["entrypoint"].partition(":")
    flow = getattr(__import__(module.removesuffix(".py").replace("/", "."), fromlist=[name]), name)
    assert flow.name == "catalogue-run"

    env = dict(prefect_server.env, DREAMCACHE_CODE_DIR=str(ROOT))
    prefect = str(Path(sys.executable).parent / "prefect")
    for command in (["work-pool", "create", "gpu", "--type", "process"],
                    ["work-pool", "set-concurrency-limit", "gpu", "2"]):
        subprocess.run([prefect, *command], env=env, cwd=ROOT, check=True, capture_output=True)
    result = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("catalogue-run/catalogue")

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        registered = asyncio.run(read())
    assert registered.work_pool_name == "gpu"
    assert registered.schedules[0].schedule.cron == "0 2 * * *"
    assert registered.parameters["params"]["images_per_prompt"] == 4
    # No placeholder catalogue: the run form opens with an empty source and prompt file for the operator to fill.
    assert not {"source", "prompts", "prompt_file"} & set(registered.parameters["params"])
    assert registered.global_concurrency_limit.limit == 1
    # The UI renders this schema as the run form; pydantic's bounds travel with it.
    schema = registered.parameter_openapi_schema
    params = schema["definitions"]["CatalogueRunParams"]["properties"]
    assert params["steps"]["minimum"] == 0 and params["guidance"]["enum"] == ["combined", "joint"]
    # The form reads as a person fills it: what, how many, what the shop gets, how, where; review last.
    assert list(params)[:26] == ["source", "prompts", "prompt_file", "images_per_prompt", "seed", "seed_policy",
                                 "mode", "placement_x", "placement_y", "placement_scale", "shadow", "formats", "cutout",
                                 "packshot", "preset", "sampler", "eta", "negative_prompt", "guidance", "text_scale",
                                 "image_scale", "steps", "deep_reuse_interval", "resolution", "output_prefix",
                                 "execution"]
    # The UI orders by `position`: on PostgreSQL the server keeps the schema as JSONB, which reorders its keys.
    assert [field["position"] for field in params.values()] == list(range(len(params)))
    assert list(params)[-6:] == ["approve_if", "keep_best", "review", "review_timeout_minutes", "publish_prefix",
                                 "dry_run"]
    assert params["mode"]["enum"] == ["generate", "place"] and params["review"]["enum"] == ["later", "pause"]
    assert params["preset"]["enum"] == ["model", "authors"] and "unipc" in params["sampler"]["enum"]
    # Every field is a plain widget: an optional (`anyOf` with null) renders as 'Property is type "None"'.
    assert all("anyOf" not in field and field.get("type") != "null" for field in params.values()), params
