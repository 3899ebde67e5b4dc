"""Every check a catalogue run makes of its parameters alone is made before the run exists: the deployment's
parameter schema, which the Prefect server validates a run's parameters against (the UI's form and the API),
refuses what CatalogueRunParams refuses and takes what it takes."""

import pytest
from pydantic import ValidationError

from flows.platform.params import CatalogueRunParams

GOOD = [
    {},
    {"formats": ["4:5@1080", " 16 : 9 ", "1x1@64", "3:4@4096", "2:1\n"]},
    {"approve_if": ["mdino>=0.5", "clip_t >= -1", "dino>=1.0"]},
    {"prompts": ["a {category} on a {colour} table {{literally}}", "  plain  "]},
    {"prompts": [], "prompt_file": "prompts.txt"},
    {"output_prefix": "shop/2026-12.a_b", "publish_prefix": "published/x"},
    {"resolution": 64}, {"resolution": 0},
    {"eta": 0.3, "sampler": "ddim"}, {"eta": 0.3}, {"sampler": "unipc"},
    {"negative_prompt": "blurry, low quality"}, {"negative_prompt": "   "},
]
BAD = [
    {"formats": ["wide"]}, {"formats": ["0:5"]}, {"formats": ["4:5@50"]}, {"formats": ["4:5@5000"]},
    {"formats": ["4:5", "4:5"]}, {"formats": ["123:4"]},
    {"approve_if": ["mdino>0.5"]}, {"approve_if": ["sharpness>=0.5"]}, {"approve_if": ["mdino>=1.5"]},
    {"approve_if": ["mdino>=0.5", "mdino >= 0.7"]},
    {"output_prefix": "products"}, {"output_prefix": "caches/x"}, {"output_prefix": "a//b"},
    {"output_prefix": "a/"}, {"output_prefix": "a/./b"}, {"output_prefix": "a/.."}, {"output_prefix": "shots\n"},
    {"publish_prefix": "subjects/x"}, {"publish_prefix": "x/../y"},
    {"prompts": ["   "]}, {"prompts": ["\x00\x07"]}, {"prompts": ["a {category"]}, {"prompts": ["a } mug"]},
    {"prompts": ["a {sku.x} mug"]}, {"prompts": ["a {} mug"]}, {"prompts": ["a {0} mug"]},
    {"prompts": ["a {sku!r} mug"]}, {"prompts": ["a {sku:>9} mug"]}, {"prompts": ["x" * 1001]},
    {"prompts": []}, {"prompts": [], "prompt_file": ""},
    {"negative_prompt": "\x00"}, {"resolution": 32},
    {"eta": 0.5, "sampler": "unipc"},
]


def schema_errors(params: dict) -> list:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.runs.catalogue import catalogue_run

    schema = parameter_schema(catalogue_run).model_dump_for_openapi()
    return validate({"params": params}, schema)


def with_defaults(case: dict) -> dict:
    return {"source": "s3://bucket/catalogue/", "prompts": ["a {category} on a beach"], **case}


@pytest.mark.parametrize("case", GOOD, ids=repr)
def test_the_schema_takes_what_the_parameters_take(case):
    CatalogueRunParams(**with_defaults(case))
    assert schema_errors(with_defaults(case)) == []


@pytest.mark.parametrize("case", BAD, ids=repr)
def test_the_schema_refuses_what_the_parameters_refuse(case):
    with pytest.raises(ValidationError):
        CatalogueRunParams(**with_defaults(case))
    assert schema_errors(with_defaults(case)), case


def test_a_run_with_bad_parameters_is_refused_by_the_server_and_never_exists(prefect_env):
    """The real server, as the UI's form and `prefect deployment run` meet it: refused, and no flow run made."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.runs.catalogue import catalogue_run

    deployment_id = catalogue_run.to_deployment(name="parameter-checks").apply()
    refused = [{"formats": ["4:5@99999"]}, {"approve_if": ["mdino>=0.5", "mdino>=0.6"]},
               {"output_prefix": "caches/mine"}, {"prompts": ["a {category"]}, {"prompts": []}]

    async def create_and_list():
        answers = []
        async with get_client() as client:
            for case in refused:
                with pytest.raises(PrefectHTTPStatusError) as error:
                    await client.create_flow_run_from_deployment(deployment_id, parameters={"params": with_defaults(case)})
                answers.append((error.value.response.status_code, error.value.response.json()["detail"]))
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        return answers, runs

    answers, runs = asyncio.run(create_and_list())
    assert runs == []
    assert all(status == 409 and "Validation failed" in detail for status, detail in answers), answers
    assert "params.formats" in answers[0][1] and "params.output_prefix" in answers[2][1], answers
