"""flows/worker.py's StoppableTaskWorker replaces Prefect's private subscription loop: these tests fail on a
Prefect whose task worker no longer matches what the class overrides and uses, and on private Prefect names
used anywhere else in flows/ (issue 34: no private Prefect name outside one isolated, tested class)."""

import ast
import asyncio
import hashlib
import inspect
import textwrap
from pathlib import Path

import prefect
import pytest
from prefect.client.subscriptions import Subscription
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_worker import TaskWorker

from flows.worker import StoppableTaskWorker

FLOWS = Path(__file__).resolve().parents[2] / "flows"

# Prefect's own loop as StoppableTaskWorker._subscribe_to_task_scheduling copies it (Prefect 3.8.8). Another
# fingerprint: Prefect changed the loop; carry the change into the copy, then write the new fingerprint here.
COPIED_LOOP_SHA256 = "00096f1ad003d262"


def _fingerprint(function) -> str:
    return hashlib.sha256(textwrap.dedent(inspect.getsource(function)).encode()).hexdigest()[:16]


def _a_worker(cls):
    """A worker of `cls`, made as `_serve` makes one (in a running loop), without a server: the client is lazy."""
    async def make():
        return cls(limit=1)

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        return asyncio.run(make())


def test_the_copied_subscription_loop_is_prefects_current_one():
    assert _fingerprint(TaskWorker._subscribe_to_task_scheduling) == COPIED_LOOP_SHA256, (
        f"Prefect {prefect.__version__} changed TaskWorker._subscribe_to_task_scheduling: compare it with "
        "StoppableTaskWorker's copy in flows/worker.py, carry the change over, then update COPIED_LOOP_SHA256")


def test_astart_still_runs_the_overridden_loop():
    source = inspect.getsource(TaskWorker.astart)
    assert "self._subscribe_to_task_scheduling()" in source, "astart no longer runs the loop the worker overrides"


@pytest.mark.parametrize("name", sorted(StoppableTaskWorker.PREFECT_PRIVATE_NAMES))
def test_each_private_name_the_worker_uses_exists_with_its_parameters(name):
    parameters = StoppableTaskWorker.PREFECT_PRIVATE_NAMES[name]
    if parameters is None:  # an attribute set by TaskWorker.__init__
        assert name in vars(_a_worker(TaskWorker)), f"TaskWorker no longer sets {name}"
        return
    method = getattr(TaskWorker, name, None)
    assert method is not None, f"TaskWorker has no {name} any more"
    assert inspect.iscoroutinefunction(method), f"TaskWorker.{name} is no longer a coroutine"
    assert tuple(inspect.signature(method).parameters) == parameters


def test_the_override_has_the_signature_of_what_it_overrides():
    ours, theirs = StoppableTaskWorker._subscribe_to_task_scheduling, TaskWorker._subscribe_to_task_scheduling
    assert ours is not theirs and inspect.iscoroutinefunction(ours)
    assert tuple(inspect.signature(ours).parameters) == tuple(inspect.signature(theirs).parameters)


def test_the_subscription_keeps_the_public_parts_the_loop_uses():
    assert isinstance(inspect.getattr_static(Subscription, "websocket"), property)
    assert inspect.iscoroutinefunction(Subscription.__anext__)
    subscription = Subscription(model=dict, path="/x", keys=[], base_url="http://127.0.0.1:9/api")
    with pytest.raises(RuntimeError, match="not connected"):  # what `_disconnect` takes for "nothing to close"
        subscription.websocket


def test_the_workers_own_attributes_shadow_none_of_prefects():
    ours, theirs = vars(_a_worker(StoppableTaskWorker)), vars(_a_worker(TaskWorker))
    added = set(ours) - set(theirs)
    assert added == {"stopped_by", "loop", "stop_requested"}
    assert not {name for name in added if hasattr(TaskWorker, name)}


def _private_prefect_names() -> set[str]:
    """Private attribute and method names of the Prefect classes flows/ builds on."""
    names = set()
    for cls in (TaskWorker, Subscription):
        names |= {n for n in dir(cls) if n.startswith("_") and not n.startswith("__")}
        names |= set(vars(_a_worker(TaskWorker)) if cls is TaskWorker else ())
        names |= {n for n in Subscription(model=dict, path="/x", keys=[]).__dict__} if cls is Subscription else set()
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_prefect_name_outside_the_stoppable_worker():
    private = _private_prefect_names()
    found = []
    for path in sorted(FLOWS.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        allowed = {id(node) for cls in ast.walk(tree)
                   if isinstance(cls, ast.ClassDef) and cls.name == "StoppableTaskWorker" and path.name == "worker.py"
                   for node in ast.walk(cls)}
        for node in ast.walk(tree):
            if id(node) in allowed:
                continue
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{path.relative_to(FLOWS.parent)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefect"):
                modules = node.module.split(".") + [alias.name for alias in node.names]
                if any(part.startswith("_") for part in modules):
                    found.append(f"{path.relative_to(FLOWS.parent)}:{node.lineno} from {node.module} import ...")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("prefect") and any(p.startswith("_") for p in alias.name.split(".")):
                        found.append(f"{path.relative_to(FLOWS.parent)}:{node.lineno} import {alias.name}")
    assert not found, "private Prefect names outside StoppableTaskWorker: " + ", ".join(found)


def test_the_check_above_sees_a_private_name():
    private = _private_prefect_names()
    assert {"_subscribe_to_task_scheduling", "_websocket", "_acquire_token", "_runs_task_group"} <= private
