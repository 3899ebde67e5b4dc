"""The Kubernetes GPU work pool: infra/k8s/base-job-template.json is a superset of the real Prefect kubernetes
worker's default, renders through that worker into a Job that Kubernetes' own schema accepts, and takes its
GPUs, node selector and tolerations from variables; the Helm values point the worker at that pool."""

import asyncio
import copy
import json
import re
import sys
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml

if sys.version_info < (3, 11):
    pytest.skip("prefect-kubernetes needs Python 3.11", allow_module_level=True)

import tomllib  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "k8s" / "base-job-template.json"
VALUES = ROOT / "infra" / "k8s" / "prefect-worker-values.yaml"
POOL = "gpu-k8s"
# An older minor and the newest schema kubernetes-validate ships: the Job uses nothing version-specific.
KUBERNETES_VERSIONS = ["1.30", "latest"]


@pytest.fixture(scope="module")
def template():
    return json.loads(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def default_template():
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


def container(job_configuration: dict) -> dict:
    return job_configuration["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def pod(job_configuration: dict) -> dict:
    return job_configuration["job_manifest"]["spec"]["template"]["spec"]


class NoServer:
    """Stands in for the Prefect client: a template without block or variable references needs no server
    (without one, Prefect would start a temporary server for these tests)."""

    def __getattr__(self, name):
        raise AssertionError(f"rendering the template called the Prefect API ({name})")


def render(template: dict, values: dict) -> dict:
    """The Job the worker would create for a flow run with these job variables."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=NoServer()))
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="crafty-cat", flow_id=uuid.uuid4()))
    return configuration.job_manifest


def test_the_server_accepts_the_template(template):
    from prefect.server.schemas.actions import WorkPoolCreate

    # Every {{ placeholder }} of the job configuration is a declared variable, as the server requires.
    WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=template)
    jsonschema.Draft202012Validator.check_schema(template["variables"])


def test_the_template_is_a_superset_of_the_workers_default(template, default_template):
    def leaves(node, path=()):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from leaves(value, (*path, index))
        else:
            yield path, node

    ours = dict(leaves(template["job_configuration"]))
    for path, value in leaves(default_template["job_configuration"]):
        assert ours.get(path) == value, f"job_configuration.{'.'.join(map(str, path))}: {ours.get(path)!r} != {value!r}"
    defaults = default_template["variables"]["properties"]
    for name, schema in defaults.items():
        mine = template["variables"]["properties"][name]
        kinds = {k: schema[k] for k in ("type", "anyOf", "enum", "additionalProperties") if k in schema}
        if name == "image":  # required here, so no null
            kinds = {"type": "string"}
        assert {k: mine[k] for k in kinds if k in mine} == kinds, f"variable {name} changed its type"


def test_gpus_placement_and_secrets_come_from_variables(template):
    job = template["job_configuration"]
    variables = template["variables"]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod(job)["nodeSelector"] == "{{ node_selector }}"
    assert pod(job)["tolerations"] == "{{ tolerations }}"
    assert container(job)["envFrom"] == [{"secretRef": {"name": "{{ env_secret_name }}"}}]
    assert container(job)["image"] == "{{ image }}" and variables["required"] == ["image"]
    properties = variables["properties"]
    assert properties["gpu_count"]["type"] == "integer" and properties["gpu_count"]["default"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in properties["tolerations"]["default"]
    placeholders = set(re.findall(r"\{\{\s*([\w.-]+)\s*\}\}", json.dumps(job)))
    assert placeholders <= set(properties)
    # No credentials in the pool's definition (Prefect's database keeps it, the UI shows it): the platform's
    # settings reach the pod from the Secret, and no variable carries an environment by default.
    assert container(job)["env"] == "{{ env }}" and "default" not in properties["env"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_job_is_a_valid_kubernetes_job(template, version):
    import kubernetes_validate

    manifest = render(template, {
        "image": "registry.example.com/dreamcache:0.1.0-cuda", "gpu_count": 2, "cpu_request": "8", "memory_limit": "64Gi",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "dreamcache-models", "readOnly": True}}],
        "volume_mounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    })
    spec = manifest["spec"]["template"]["spec"]
    (job_container,) = spec["containers"]
    assert job_container["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "64Gi"}
    assert job_container["resources"]["requests"] == {"cpu": "8"}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0]["value"] == "h100" and spec["securityContext"]["runAsNonRoot"] is True
    assert job_container["args"] == ["prefect", "flow-run", "execute"]
    assert job_container["envFrom"] == [{"secretRef": {"name": "dreamcache"}}]
    assert manifest["metadata"]["namespace"] == "dreamcache"
    # Prefect's own template (and its validation) puts parallelism and completions in the pod spec, where
    # Kubernetes ignores them; everything else must pass the strict schema.
    strict = copy.deepcopy(manifest)
    assert strict["spec"]["template"]["spec"].pop("parallelism") == 1
    assert strict["spec"]["template"]["spec"].pop("completions") == 1
    target = kubernetes_validate.latest_version() if version == "latest" else version
    kubernetes_validate.validate(strict, target, strict=True)


def test_defaults_render_one_gpu_and_the_gpu_toleration(template):
    manifest = render(template, {"image": "registry.example.com/dreamcache:0.1.0-cuda"})
    spec = manifest["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_a_flow_run_without_an_image_is_refused(template):
    """The check the server makes when a flow run is created: Prefect's own image lacks the platform's code."""
    from prefect.utilities.schema_tools import ValidationError, validate

    def check(values):
        validate(values, template["variables"], raise_on_error=True, preprocess=True, ignore_required=False,
                 allow_none_with_default=True)

    with pytest.raises(ValidationError, match="'image' is a required property"):
        check({"gpu_count": 1})
    check({"image": "registry.example.com/dreamcache:0.1.0-cuda"})
    with pytest.raises(ValidationError):
        check({"image": "registry.example.com/dreamcache:0.1.0-cuda", "gpu_count": -1})


def test_helm_values_point_the_worker_at_the_pool(template):
    values = yaml.safe_load(VALUES.read_text())
    worker = values["worker"]
    assert worker["config"]["workPool"] == POOL and worker["config"]["type"] == "kubernetes"
    assert worker["config"]["installPolicy"] == "never"
    assert worker["apiConfig"] == "selfHostedServer"
    assert re.fullmatch(r"https?://[^/]+/api", worker["selfHostedServerApiConfig"]["apiUrl"])
    # The template has one source: the file, passed with --set-file at install time.
    assert worker["config"]["baseJobTemplate"]["configuration"] is None
    pin = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if r.startswith("prefect=="))
    assert worker["image"]["prefectTag"].startswith(pin.removeprefix("prefect==") + "-"), "worker and server versions differ"


def test_every_manifest_parses():
    files = sorted((ROOT / "infra" / "k8s").iterdir())
    assert {f.name for f in files} >= {"base-job-template.json", "prefect-worker-values.yaml", "migrate-job.yaml"}
    for path in files:
        document = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        assert isinstance(document, dict) and document, path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_migrate_job_is_a_valid_job_with_the_platform_secret(template, version):
    import kubernetes_validate

    job = yaml.safe_load((ROOT / "infra" / "k8s" / "migrate-job.yaml").read_text())
    target = kubernetes_validate.latest_version() if version == "latest" else version
    kubernetes_validate.validate(job, target, strict=True)
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["dreamcache", "db", "upgrade"]
    secret = template["variables"]["properties"]["env_secret_name"]["default"]
    assert migrate["envFrom"] == [{"secretRef": {"name": secret}}]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
