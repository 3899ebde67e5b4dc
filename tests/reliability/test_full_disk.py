"""A full disk under the local object store (the embedded default), injected at the one place a local write
puts its bytes (`db.objects._write`): from the moment it fills, every write fails with ENOSPC after putting
part of its bytes down, as a real full disk does.

Whichever write meets it (a product cache, a shot, a contact sheet), nothing partial is left: no temporary,
no half object, no shot without its sidecar; the run fails in one line naming the file and what to do; what
was made before is kept whole; and once there is space again, a re-run finishes and `dreamcache verify`
finds everything whole (docs/reliability.md)."""

import errno
import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from db import objects
from db.models import Generation, Run
from flows.cli import app
from tests.helpers import home_database

PROMPTS = ["a {category} on a beach", "a {category} in the snow"]
PLANNED = 3 * 2 * 2


def run_args(catalogue) -> list[str]:
    return ["run", "--embedded", "--source", str(catalogue), "--images-per-prompt", "2", "--steps", "2",
            "--batch-size", "2"] + [arg for p in PROMPTS for arg in ("-p", p)]


class FullDisk:
    """Writes go through until the disk fills: at the first write of a key `fills_at` accepts, and for every
    write after it. A failing write puts half its bytes down first."""

    def __init__(self, fills_at):
        self.fills_at, self.full, self.failed = fills_at, False, []
        self.write = objects._write

    def __call__(self, file, data: bytes) -> None:
        self.full = self.full or self.fills_at(file.name)
        if self.full:
            self.failed.append(file.name)
            file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.write(file, data)


def shots_written(count: int):
    """The disk fills after `count` shot images (and their sidecars) have been written."""
    seen = []

    def fills(name: str) -> bool:
        base = Path(name).name
        if "/shots/" in name and base.startswith(".") and ".png." in base and "contact_sheet" not in base:
            seen.append(base)
        return len(seen) > count
    return fills


WHERE = {
    "a product cache": lambda name: "/caches/" in name,
    "a shot": shots_written(3),
    "a contact sheet": lambda name: ".contact_sheet.png." in name,
}


@pytest.mark.parametrize("where", list(WHERE))
def test_a_full_disk_leaves_no_partial_file_and_keeps_what_was_made(platform_env, catalogue, tmp_path, monkeypatch,
                                                                     caplog, where):
    disk = FullDisk(WHERE[where])
    monkeypatch.setattr(objects, "_write", disk)
    failed = CliRunner().invoke(app, run_args(catalogue))
    assert disk.failed, f"the disk never filled at {where}"
    assert failed.exit_code == 1, failed.output
    # No traceback logged: a full disk is named on purpose. (The output is not searched for one: a handler
    # Prefect's logging set up holds an earlier CliRunner's closed stream and reports that, not the run.)
    assert not [record.getMessage() for record in caplog.records if record.exc_info]
    (error,) = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert error.startswith("error: writing file://") and ("No space left on device; free space on the object "
                                                          "store's disk and run again") in error, error

    root = tmp_path / "home" / "objects"
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    assert not [key for key in files if Path(key).name.startswith(".")], "a temporary was left behind"
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        done = db.execute(select(Generation.output_uri, Generation.output_sha256)
                          .where(Generation.status == "done")).all()
        (run,) = db.execute(select(Run.status, Run.error)).all()
    assert run.status == "failed" and "No space left on device" in run.error
    shots = {key for key in files if key.startswith("shots/") and key.endswith(".png")
             and not key.endswith(("contact_sheet.png", ".text-only.png"))}
    assert shots == {uri.removeprefix(root.as_uri() + "/") for uri, _ in done}  # no shot that is not done
    for uri, digest in done:  # each done shot whole, with its sidecar
        path = Path(uri.removeprefix("file://"))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and path.with_suffix(".json").is_file()
    expected_done = {"a product cache": 0, "a shot": 3, "a contact sheet": PLANNED}[where]
    assert len(done) == expected_done  # what was made before the disk filled is kept

    monkeypatch.setattr(objects, "_write", disk.write)  # space again
    again = CliRunner().invoke(app, run_args(catalogue))
    assert again.exit_code == 0, again.output
    with engine.connect() as db:
        assert dict(db.execute(select(Generation.status, func.count()).group_by(Generation.status)).all()) == \
            {"done": PLANNED}
    engine.dispose()
    verified = CliRunner().invoke(app, ["verify"])
    assert verified.exit_code == 0 and "all whole" in verified.output, verified.output
