"""The model library stays a library: it imports neither orchestration nor persistence.

(boto3 is not checked at run time: a third-party dependency imports it when installed.)
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is not installed in this environment"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_importing_the_library_loads_no_orchestration_or_database():
    code = (
        "import sys, dreamcache.pipeline, dreamcache.cli, dreamcache.demo, dreamcache.weights;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'sqlalchemy', 'alembic', 'db', 'flows'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
