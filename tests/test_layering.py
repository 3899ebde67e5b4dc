"""The model library stays a library (no orchestration, no persistence), and its wings point one way.

(boto3 is not checked at run time: a third-party dependency imports it when installed.)
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is not installed in this environment"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_importing_the_library_loads_no_orchestration_or_database():
    code = (
        "import sys, dreamcache.core.pipeline, dreamcache.app.cli, dreamcache.app.demo, dreamcache.core.weights;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'sqlalchemy', 'alembic', 'db', 'flows'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["dreamcache", "flows"])
def test_no_module_imports_itself_round_a_circle(package):
    import grimp

    graph = grimp.build_graph(package)
    modules = sorted(graph.modules)
    circles = [(a, b) for a in modules for b in graph.find_modules_directly_imported_by(a)
               if b.startswith(f"{package}.") and graph.find_shortest_chain(importer=b, imported=a)]
    assert circles == []


def test_every_wing_says_what_it_is_and_what_it_may_import():
    for wing in ("core", "perception", "training", "world", "app"):
        doc = (ROOT / "dreamcache" / wing / "__init__.py").read_text()
        assert doc.startswith('"""') and "\nMay import " in doc, wing


def test_every_room_of_flows_says_what_it_is_and_what_it_may_import():
    for room in ("runs", "steps", "platform"):
        assert (ROOT / "flows" / room / "__init__.py").read_text().startswith('"""'), room
    for room in ("runs", "platform"):
        assert "\nMay import " in (ROOT / "flows" / room / "__init__.py").read_text(), room
    assert "imports only the steps" in (ROOT / "flows" / "steps" / "__init__.py").read_text()
