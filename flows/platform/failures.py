"""Failures: which are worth a retry, and each said in one line (the CLI's `error:` and a Prefect run's state).

A permanent failure is one no retry can fix: an input that is wrong (a validation error, a missing file, an
S3 bucket or key that does not exist, credentials that lack a permission). The run's tasks fail on it at
once (`retry_unless_permanent`, their `retry_condition_fn`); anything else (throttling, a dropped
connection, a database restart) keeps the tasks' retries. The catalogue in docs/reliability.md lists them.
"""

from __future__ import annotations

from sqlalchemy import make_url

from db.objects import PERMANENT_S3_CODES, ObjectStoreError, S3Error
from dreamcache.core.errors import DreamCacheError

# The longest message a run's state carries (Prefect shows it in the UI's run list).
MAX_MESSAGE_CHARS = 1000


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying what raised `exc` cannot help."""
    if isinstance(exc, S3Error):
        return exc.permanent
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code"):  # a botocore ClientError as it is
        return str(response["Error"]["Code"]) in PERMANENT_S3_CODES
    # DreamCacheError: raised on purpose about an input (an image, a cache, weights, settings, a place);
    # ValueError covers pydantic's ValidationError and decoding errors; a missing file stays missing.
    return isinstance(exc, (DreamCacheError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                            NotADirectoryError))


def is_expected(exc: BaseException) -> bool:
    """Whether `exc` is a failure the platform names on purpose (its message says it all: no traceback)."""
    return is_permanent(exc) or isinstance(exc, (DreamCacheError, ObjectStoreError))


def retry_unless_permanent(task, task_run, state) -> bool:
    """A Prefect task's `retry_condition_fn`: retry unless the failure is permanent (`is_permanent`).

    Prefect 3 calls it with the task, the task run and the Failed state, whose data is the exception."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return True
    return not (isinstance(exc, BaseException) and is_permanent(exc))


def _message(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg']}" for e in exc.errors())
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]  # KeyError's str() quotes its message
    return str(exc)


def one_line(exc: BaseException) -> str:
    """Why `exc` happened, in one line: the message of an error raised on purpose; otherwise the exception's
    type and message (a bug's traceback belongs in the log, never in this line)."""
    message = "; ".join(line.strip() for line in _message(exc).splitlines() if line.strip())
    if not is_expected(exc) or not message:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


def database_problem(url: str, exc: BaseException) -> str:
    """One line naming the database (its password hidden) and why it cannot be used."""
    reason = getattr(exc, "orig", None) or exc  # SQLAlchemy's wrapper: the driver's own message says it
    text = "; ".join(line.strip() for line in str(reason).splitlines() if line.strip())
    text = text.split("; (Background on this error")[0]
    try:
        parsed = make_url(url)
        safe = parsed.render_as_string(hide_password=True)
        if parsed.password:
            text = text.replace(str(parsed.password), "***")
    except Exception:
        safe = "the configured database"
    return f"database {safe}: {text or type(reason).__name__}"
