"""docs/operations.md names files that exist, `dreamcache` commands that exist, and the pool, template and
values that infra/ defines."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "operations.md").read_text()


def test_cited_files_exist():
    user_made = {"infra/.env"}  # copied from infra/.env.example by the user
    cited = set(re.findall(r"\b(infra/[\w./-]*[\w-]|docs/[\w.-]+\.md)", GUIDE)) - user_made
    assert "infra/compose.yaml" in cited
    missing = [path for path in cited if not (ROOT / path).exists()]
    assert not missing, f"docs/operations.md cites files that do not exist: {missing}"


def test_cited_dreamcache_commands_exist():
    import flows.cli

    commands = {c.name or c.callback.__name__.replace("_", "-") for c in flows.cli.app.registered_commands}
    groups = {g.name: {c.name for c in g.typer_instance.registered_commands} for g in flows.cli.app.registered_groups}
    # The command, not the namespace (`-n dreamcache`), the database (`-U dreamcache dreamcache`) or a path.
    cited = re.findall(r"(?:(?<=bin/)|(?<![\w/.-])(?<!-n )(?<!-U ))dreamcache (db [a-z]+|[a-z][\w-]*)", GUIDE)
    assert cited
    for command in cited:
        group, _, sub = command.partition(" ")
        known = sub in groups.get(group, ()) if sub else command in commands | set(groups)
        assert known, f"`dreamcache {command}` is no command"


def test_kubernetes_steps_use_the_pool_template_and_values():
    template = json.loads((ROOT / "infra" / "k8s" / "base-job-template.json").read_text())
    values = yaml.safe_load((ROOT / "infra" / "k8s" / "prefect-worker-values.yaml").read_text())
    pool = values["worker"]["config"]["workPool"]
    namespace = template["variables"]["properties"]["namespace"]["default"]
    secret = template["variables"]["properties"]["env_secret_name"]["default"]
    assert f"prefect work-pool create {pool} --type kubernetes --base-job-template infra/k8s/base-job-template.json" in GUIDE
    assert f"prefect work-pool set-concurrency-limit {pool} " in GUIDE
    assert "--set-file worker.config.baseJobTemplate.configuration=infra/k8s/base-job-template.json" in GUIDE
    assert f"--namespace {namespace}" in GUIDE and "-f infra/k8s/prefect-worker-values.yaml" in GUIDE
    assert f"kubectl -n {namespace} create secret generic {secret} " in GUIDE
    assert f"--pool {pool}" in GUIDE and "--job-variable image=" in GUIDE
