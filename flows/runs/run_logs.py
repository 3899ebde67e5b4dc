"""The platform's log lines in a Prefect run's logs: a handler on the platform's loggers that sends the lines made
inside a flow or task run to that run (the UI shows them), and the INFO level where a run starts."""

import logging

# The platform's own loggers: their lines go to the console as ever and, when made inside a Prefect flow or task
# run, to that run's logs in the UI as well.
PLATFORM_LOGGERS = ("flows", "db", "dreamcache")
_RUN_LOGS = "dreamcache-run-logs"  # the handler's name: attached once, however often the flow's file is loaded


def send_platform_logs_to_prefect() -> None:
    """Send the platform's log lines made inside a Prefect flow or task run to that run's logs, in whichever
    process runs it: a worker's flow run, a served deployment, `dreamcache run --prefect`, a task worker.

    Called when the flow's module is loaded (flows/runs/catalogue.py), rather than left to
    PREFECT_LOGGING_EXTRA_LOGGERS: that setting must reach every process's environment, and it attaches the
    handler without a level, so the loggers would keep the root's WARNING and drop the INFO lines (the run's
    summary; `log_platform_info` lets them through where a run starts). Lines made outside any run (embedded
    runs, a heartbeat thread) have no run to go to.
    """
    from prefect.logging.handlers import APILogHandler

    for name in PLATFORM_LOGGERS:
        platform_logger = logging.getLogger(name)
        if any(handler.get_name() == _RUN_LOGS for handler in platform_logger.handlers):
            continue
        handler = APILogHandler()
        handler.set_name(_RUN_LOGS)
        handler.addFilter(_in_a_prefect_run)
        platform_logger.addHandler(handler)


def log_platform_info() -> None:
    """Let the platform's INFO lines through, for a Prefect run's logs: called where a flow run or a task worker
    starts, not on import, so that an embedded run's console keeps to warnings (it prints its own progress)."""
    for name in PLATFORM_LOGGERS:
        platform_logger = logging.getLogger(name)
        if platform_logger.level == logging.NOTSET:  # a level the operator set stays
            platform_logger.setLevel(logging.INFO)


def _in_a_prefect_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
