"""infra/Dockerfile, checked without a container engine: its dependencies come from pyproject.toml, it runs
as a non-root user, carries no secrets, and the build context (.dockerignore) holds only what it installs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info < (3, 11):
    pytest.skip("infra/requirements.py reads pyproject.toml with tomllib, as the image's Python 3.11 does",
                allow_module_level=True)

import tomllib  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY\b|API_KEY|ACCESS_KEY", re.IGNORECASE)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def stages(parsed: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions, FROM included."""
    result, current = {}, None
    for keyword, arguments in parsed:
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", arguments, re.IGNORECASE)
            assert match, f"every stage is named: FROM {arguments}"
            current = result.setdefault(match.group(1), [])
        if current is not None:
            current.append((keyword, arguments))
    return result


def lineage(all_stages, name: str) -> list[tuple[str, str]]:
    """A target's instructions including those of the stages it is built FROM."""
    own = all_stages[name]
    parent = own[0][1].split()[0]
    return (lineage(all_stages, parent) if parent in all_stages else []) + own


def pip_installs(run: str) -> list[list[str]]:
    return [shlex.split(part)[shlex.split(part).index("install") + 1:]
            for part in run.split("&&") if re.search(r"\bpip install\b", part)]


@pytest.fixture(scope="module")
def dockerfile():
    parsed = instructions(DOCKERFILE.read_text())
    return parsed, stages(parsed)


def test_cpu_and_cuda_targets_exist(dockerfile):
    _, all_stages = dockerfile
    assert {"cpu", "cuda"} <= set(all_stages)
    cpu_from = [a for k, a in lineage(all_stages, "cpu") if k == "FROM"]
    cuda_from = [a for k, a in lineage(all_stages, "cuda") if k == "FROM"]
    assert any("deps-cpu" in a for a in cpu_from) and any("deps-cuda" in a for a in cuda_from)
    # triton compiles its launchers when torch.compile first runs on a GPU.
    cuda_runs = " ".join(a for k, a in lineage(all_stages, "cuda") if k == "RUN")
    assert re.search(r"apt-get install [^&]*\bgcc\b", cuda_runs)


def test_dependencies_are_installed_only_from_pyproject(dockerfile):
    parsed, all_stages = dockerfile
    requirements_stage = all_stages["requirements"]
    copies = [a for k, a in requirements_stage if k == "COPY"]
    assert any("pyproject.toml" in a.split() and "infra/requirements.py" in a.split() for a in copies)
    runs = " && ".join(a for k, a in requirements_stage if k == "RUN")
    generated = set(re.findall(r"python /build/requirements\.py /build/pyproject\.toml[^>&]*> (\S+)", runs))
    assert generated == {"/build/requirements.txt", "/build/torch.txt"}

    installs = [args for k, a in parsed if k == "RUN" for args in pip_installs(a)]
    assert installs, "the Dockerfile installs nothing with pip"
    options_with_value = {"--index-url", "-r", "-e"}
    for args in installs:
        assert "--no-cache-dir" in args, f"pip install without --no-cache-dir: {args}"
        positional, files, i = [], [], 0
        while i < len(args):
            if args[i] in options_with_value:
                if args[i] == "-r":
                    files.append(args[i + 1])
                elif args[i] == "-e":
                    positional.append(("editable", args[i + 1]))
                i += 2
            elif args[i].startswith("-"):
                i += 1
            else:
                positional.append(("package", args[i]))
                i += 1
        # Either requirement files generated from pyproject.toml, or the project itself without dependencies.
        assert not [p for p in positional if p[0] == "package"], f"hand-written packages in pip install {args}"
        if files:
            assert set(files) <= generated, f"requirement files not generated from pyproject.toml: {files}"
        else:
            assert positional == [("editable", "/opt/dreamcache")] and "--no-deps" in args, args


def test_the_requirement_list_is_pyproject_dependencies():
    script = ROOT / "infra" / "requirements.py"
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    every = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml")],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert every == expected
    torch_only = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "--only", "torch", "torchvision"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
    assert torch_only == [r for r in expected if re.match(r"torch(vision)?\b", r)] and len(torch_only) == 2
    missing = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "--only", "tensorflow"],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "tensorflow" in missing.stderr


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_targets_run_as_a_numeric_non_root_user_with_no_entrypoint(dockerfile, target):
    _, all_stages = dockerfile
    steps = lineage(all_stages, target)
    users = [a for k, a in steps if k == "USER"]
    assert users, f"{target} runs as root"
    uid = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot (set in the base job template) can check it.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    last_user = max(i for i, (k, _) in enumerate(steps) if k == "USER")
    assert last_user > max(i for i, (k, _) in enumerate(steps) if k in {"RUN", "COPY"}), "steps after USER run as root"
    # Prefect's kubernetes worker passes `prefect flow-run execute` as the container's args.
    assert not [a for k, a in steps if k == "ENTRYPOINT"]


def test_no_secrets_in_env_or_build_args(dockerfile):
    parsed, _ = dockerfile
    for keyword, arguments in parsed:
        if keyword in {"ENV", "ARG"}:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments) or [arguments.split("=")[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{keyword} {arguments}"


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """Docker's rules, in order: a path is left out when the last pattern matching it or one of its
    parent folders is not a `!` exception."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\[cod\]", "[cod]")
        patterns.append((include, re.compile(f"^{regex}$")))
    return patterns


def in_build_context(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for include, pattern in _dockerignore_patterns():
        if any(pattern.match(c) for c in candidates):
            included = include
    return included


def test_build_context_holds_only_what_the_image_installs(dockerfile):
    parsed, _ = dockerfile
    assert _dockerignore_patterns()[0] == (False, re.compile(r"^[^/]*$")), ".dockerignore starts by leaving everything out"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    needed = {"pyproject.toml", "README.md", "alembic.ini", "prefect.yaml", "infra/requirements.py"}
    needed |= {f for f in tracked if f.split("/")[0] in {"alembic", "db", "dreamcache", "flows"}}
    assert not [f for f in needed if not in_build_context(f)]
    for copy in (a for k, a in parsed if k == "COPY" and not a.startswith("--from")):
        for source in copy.split()[:-1]:
            assert source == "." or in_build_context(source), f"COPY {source} is left out by .dockerignore"
    for left_out in (".venv/bin/python", ".git/HEAD", ".whl/torch.whl", ".world/pool/0.png", "tests/conftest.py",
                     "bench/results.json", "docs/sql.md", "infra/.env", "dreamcache/__pycache__/cache.cpython-311.pyc",
                     "dreamcache.egg-info/PKG-INFO", "outputs/shot.png"):
        assert not in_build_context(left_out), left_out
