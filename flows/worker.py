"""`dreamcache worker`: Prefect's task worker, stopped cleanly by SIGTERM (as Kubernetes sends it) or Ctrl-C.

On the first signal the worker takes no more task runs and finishes those it holds (the batch it has
started, and any it has received and acknowledged: the server sends those to no one else); a run sent to it
but not yet acknowledged goes back to the server when the worker disconnects, for another worker. A second
signal stops it at once; what it held is then taken over like a dead worker's (docs/reliability.md).

Prefect has no public way to stop a task worker *between* runs: `TaskWorker.astop` raises into the
subscription loop wherever it waits, and a cancel scope around `serve` cancels the runs in hand with it, so
either could stop a run between its acknowledgement and its start. `StoppableTaskWorker` therefore replaces
Prefect 3's subscription loop (`TaskWorker._subscribe_to_task_scheduling`) with a copy that waits for the next
run *or* the stop. It is the one place in flows/ that uses Prefect's private names; they are listed in
`PREFECT_PRIVATE_NAMES`, and tests/flows/test_worker_prefect_internals.py fails on any Prefect whose task
worker no longer has them as this class expects (upgrade Prefect there first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from prefect.client.schemas.objects import TaskRun
from prefect.client.subscriptions import Subscription
from prefect.settings import get_current_settings
from prefect.task_worker import TaskWorker

logger = logging.getLogger("prefect.task_worker")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppableTaskWorker(TaskWorker):
    """A task worker that stops between task runs, letting the runs it holds finish."""

    # The private parts of Prefect's TaskWorker this class overrides or uses, with the parameters each
    # takes (None: an attribute); the test checks them against the installed Prefect.
    PREFECT_PRIVATE_NAMES = {
        "_subscribe_to_task_scheduling": ("self",),  # overridden: the subscription loop `astart` runs
        "_acquire_token": ("self", "task_run_id"),  # a slot of `limit` for the run, or False if it holds one
        "_safe_submit_scheduled_task_run": ("self", "task_run"),  # runs it, records it, gives the slot back
        "_runs_task_group": None,  # where the runs in hand live (entered by `__aenter__`)
    }

    def __init__(self, *tasks: Any, limit: int | None = 1):
        super().__init__(*tasks, limit=limit)
        # Public names of our own: a private one could collide with one a later Prefect adds to TaskWorker.
        self.stopped_by: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_requested = asyncio.Event()

    def handle_sigterm(self, signum: int, frame: object) -> None:
        # Prefect installs this for SIGTERM when a worker starts in the main thread: stop as on any signal.
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, name: str) -> None:
        """From a signal handler: the first call stops gracefully, a second at once."""
        if self.stopped_by is not None:
            os._exit(128 + signal.Signals[name].value)
        self.stopped_by = name
        if self.loop is not None:  # thread-safe, and it wakes the loop from its wait
            self.loop.call_soon_threadsafe(self.stop_requested.set)

    async def _subscribe_to_task_scheduling(self) -> None:
        base_url = get_current_settings().api.url
        if base_url is None:
            raise ValueError("`PREFECT_API_URL` must be set to use the task worker.")
        names = " | ".join(key.split(".")[-1].split("-")[0] for key in sorted(self.task_keys))
        logger.info(f"Subscribing to runs of task(s): {names}")
        subscription = Subscription(model=TaskRun, path="/task_runs/subscriptions/scheduled", keys=self.task_keys,
                                    client_id=self.client_id, base_url=base_url)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        receiving = None
        try:
            while not self.stop_requested.is_set():
                receiving = asyncio.ensure_future(subscription.__anext__())
                await asyncio.wait({receiving, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()  # nothing acknowledged: the server gives that run to another worker
                try:
                    task_run = await receiving
                except asyncio.CancelledError:
                    if receiving.cancelled() and self.stop_requested.is_set():
                        break
                    raise
                logger.info(f"Received task run: {task_run.id} - {task_run.name}")
                if await self._acquire_token(task_run.id):  # acknowledged: this worker runs it, stopping or not
                    self._runs_task_group.start_soon(self._safe_submit_scheduled_task_run, task_run)
        finally:
            for waiting in (stop, receiving):
                if waiting is not None and not waiting.done():
                    waiting.cancel()
            await _disconnect(subscription)
        while self.current_tasks:  # finish the runs in hand before the worker closes its pool and client
            await asyncio.sleep(0.1)


async def _disconnect(subscription: Subscription) -> None:
    """Close the subscription's websocket, if it is connected (Prefect's Subscription has no close of its own)."""
    try:
        websocket = subscription.websocket
    except RuntimeError:  # "Subscription is not connected"
        return
    try:
        await websocket.close()
    except Exception:
        pass  # already closed by the server or the network: nothing is left to give back


async def _serve(*tasks: Any, limit: int) -> str | None:
    worker = StoppableTaskWorker(*tasks, limit=limit)
    worker.loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda s, _frame: worker.request_stop(signal.Signals(s).name))
    await worker.astart()
    return worker.stopped_by


def serve_until_stopped(*tasks: Any, limit: int = 1) -> str | None:
    """Serve `tasks` until SIGTERM or SIGINT (then: the signal's name) or until the worker ends."""
    return asyncio.run(_serve(*tasks, limit=limit))
