"""The command starts without the heavy libraries: `dreamcache --help` and `dreamcache history` import neither
torch, diffusers nor Prefect (they cost 20-30 s on a small machine); commands that need them import them.
Start-up times are measured by bench/startup.py, not here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "prefect")

# Runs the CLI in this process as the console script would, then lists which heavy libraries were imported.
PROBE = """
import json, sys
sys.argv = ["dreamcache", *json.loads(sys.argv[1])]
from flows.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _loaded(args: list[str], home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMCACHE_", "PREFECT_"))}
    env["DREAMCACHE_HOME"] = str(home)
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import sys, flows.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["history"], ["db", "current"]],
                         ids=["help", "run-help", "history", "db-current"])
def test_commands_that_load_no_model_import_no_heavy_library(args, tmp_path):
    outcome = _loaded(args, tmp_path)
    assert outcome == {"code": 0, "loaded": []}


def test_a_command_that_needs_the_model_still_gets_it(tmp_path):
    # The lazy imports are lazy, not missing: the settings still make a torch device when asked.
    code = ("import sys; from dreamcache.app.config import load_settings; "
            "print(load_settings(home=sys.argv[1], device='cpu').torch_device, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["cpu", "True"]
