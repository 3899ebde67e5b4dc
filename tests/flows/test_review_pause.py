"""The review gate on a real Prefect server: a deployment run pauses with a typed input form, a reviewer's decision
resumes it, the states land in PostgreSQL, and only the approved shots are published to S3."""

import csv
import io
import json
import time

import boto3
from sqlalchemy import create_engine, text

DEPLOYMENT = "catalogue-run/catalogue"


def wait_for(flow_run_id, done, what: str, seconds: float = 240):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if done(run.state):
                return run
            assert not run.state.is_final(), f"the run ended ({run.state}) before it was {what}"
            time.sleep(1)
    raise TimeoutError(f"the run was not {what} within {seconds} s")


def test_a_paused_run_takes_the_reviewers_decision_and_publishes_only_what_was_approved(served):
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run
    from prefect.input.run_input import keyset_from_paused_state
    from prefect import get_client

    params = dict(source=f"s3://{served['bucket']}/catalogue/", prompts=["a {category} on a beach"],
                  images_per_prompt=2, steps=2, output_prefix="shots", review="pause", review_timeout_minutes=5,
                  publish_prefix="shop")
    flow_run = run_deployment(DEPLOYMENT, parameters={"params": params}, timeout=0)
    paused = wait_for(flow_run.id, lambda state: state.is_paused(), "paused for review")

    engine = create_engine(served["database"])
    with engine.connect() as db:
        shots = db.execute(text("SELECT generation_id, sku, review FROM generation_history ORDER BY generation_id")).all()
    assert len(shots) == 3 * 2 and {s.review for s in shots} == {"pending"}  # no rule: a person decides everything
    ids = [s.generation_id for s in shots]

    # The form the UI shows: the typed decision, described with the shots waiting for review.
    keyset = keyset_from_paused_state(paused.state)
    with get_client(sync_client=True) as client:
        description = client.read_flow_run_input(paused.id, keyset["description"])
        schema = json.loads(client.read_flow_run_input(paused.id, keyset["schema"]))
    assert all(f"| {i} |" in description for i in ids), description
    assert {"approve", "reject", "rest", "reviewer", "note"} <= set(schema["properties"]), schema

    approve, reject = ids[:2], ids[2:3]
    resume_flow_run(paused.id, run_input=dict(approve=approve + [999_999], reject=reject, rest="pending",
                                              reviewer="ana", note="two keepers"))
    final = wait_for(flow_run.id, lambda state: state.is_final(), "finished after the review")
    assert final.state.is_completed(), final.state

    with engine.connect() as db:
        states = dict(db.execute(text("SELECT id, review FROM generations")).all())
        reviewers = set(db.scalars(text("SELECT reviewed_by FROM generations WHERE review <> 'pending'")))
        published = dict(db.execute(text("SELECT id, published_uri FROM generations "
                                          "WHERE published_uri IS NOT NULL")).all())
    engine.dispose()
    assert {i for i, state in states.items() if state == "approved"} == set(approve)
    assert {i for i, state in states.items() if state == "rejected"} == set(reject)
    assert {i for i, state in states.items() if state == "pending"} == set(ids[3:])
    assert reviewers == {"ana"}

    # Only the approved shots reach the shop's prefix, listed in its manifest.
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=served["bucket"], Prefix="platform/shop/")["Contents"]}
    images = {k for k in keys if k.endswith(".png")}
    assert set(published) == set(approve)
    assert {uri.removeprefix(f"s3://{served['bucket']}/") for uri in published.values()} == images
    manifest = s3.get_object(Bucket=served["bucket"], Key="platform/shop/manifest.csv")["Body"].read().decode()
    assert sorted(row["uri"] for row in csv.DictReader(io.StringIO(manifest))) == sorted(published.values())
