"""The catalogue deployment on a real Prefect server, triggered through the API as the UI does.

Backends: PostgreSQL (started by the suite) and S3 (a moto server over HTTP); catalogue in S3.
"""

import asyncio
from pathlib import Path

import boto3
from sqlalchemy import create_engine, func, select

from db.models import Generation, RejectedItem

DEPLOYMENT = "catalogue-run/catalogue"


def trigger(bucket: str, **overrides):
    from prefect.deployments import run_deployment

    params = dict(source=f"s3://{bucket}/catalogue/", prompts=["a {category} on a beach"], images_per_prompt=2,
                  steps=2, batch_size=4, output_prefix="shots", **overrides)
    return run_deployment(DEPLOYMENT, parameters={"params": params}, timeout=300, poll_interval=1)


def test_a_deployment_run_writes_to_s3_and_postgres(served):
    from prefect import get_client

    flow_run = trigger(served["bucket"])
    assert flow_run.state.is_completed(), flow_run.state

    engine = create_engine(served["database"])
    with engine.connect() as db:
        done = db.scalars(select(Generation.output_uri).where(Generation.status == "done")).all()
        rejected = db.scalars(select(RejectedItem.item)).all()
    assert len(done) == 3 * 2 and all(uri.startswith(f"s3://{served['bucket']}/platform/shots/") for uri in done)
    assert sorted(Path(r).name for r in rejected) == ["BROKEN.png", "NOT-AN-IMAGE.jpg"]
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=served["bucket"],
                                                                  Prefix="platform/shots/")["Contents"]}
    assert {uri.removeprefix(f"s3://{served['bucket']}/") for uri in done} <= keys
    assert {"platform/shots/MUG-1/contact_sheet.png", "platform/shots/LAMP-1/contact_sheet.png"} <= keys

    async def artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))

    found = asyncio.run(artifacts())
    kinds = {a.type for a in found}
    assert {"progress", "table", "markdown"} <= kinds
    table = next(a for a in found if a.type == "table")
    assert "MUG-1" in str(table.data)

    # A second trigger generates nothing new.
    again = trigger(served["bucket"])
    assert again.state.is_completed()
    with engine.connect() as db:
        assert db.scalar(select(func.count()).select_from(Generation)) == 6
    summary = asyncio.run(_result(again))
    assert summary["images_generated"] == 0


async def _result(flow_run):
    from prefect import get_client

    async with get_client() as client:
        run = await client.read_flow_run(flow_run.id)
    return await run.state.result(fetch=True) if run.state.data else await _summary_from_db(run)


async def _summary_from_db(run):
    from dreamcache.app.config import Settings
    from db.models import Run

    engine = create_engine(Settings().resolved_database_url)
    with engine.connect() as db:
        return db.execute(select(Run.summary).where(Run.flow_run_id == str(run.id))).scalar_one()
