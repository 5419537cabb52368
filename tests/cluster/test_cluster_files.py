"""Every file under cluster/ validates: launcher YAMLs with Ray's own schema, KubeRay manifests by their
required RayCluster/RayJob v1 fields. Plus the security properties each file promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
ALL = sorted(p for p in CLUSTER.rglob("*.y*ml"))
LAUNCHER = [p for p in ALL if "kuberay" not in p.parts]
KUBERAY = [p for p in ALL if "kuberay" in p.parts]


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def test_the_promised_files_exist():
    names = set(_ids(ALL))
    assert {"cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml", "cluster/onprem.yaml",
            "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"} <= names


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_yaml_passes_rays_schema(path):
    # The same two steps `ray up` runs before touching a cloud (_bootstrap_config): fill in the provider's
    # defaults, then validate against ray-schema.json plus Ray's cross-field rules.
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_schema_validation_catches_a_broken_file():
    # Guard against a vacuous test: a typo'd key must fail the same validation.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    raw["available_node_types"]["gpu_a10g_4x"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_gpu_types_scale_to_zero_on_spot(name):
    raw = yaml.safe_load((CLUSTER / name).read_text())
    assert raw["idle_timeout_minutes"] > 0 and raw["max_workers"] >= 1
    gpu_types = {k: v for k, v in raw["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}
    assert sorted(t["resources"]["GPU"] for t in gpu_types.values()) == [4, 8]
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    for spec in gpu_types.values():
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1
        text = yaml.safe_dump(spec["node_config"])
        assert "spot" in text.lower()
    assert "gpu" in raw["docker"]["worker_image"]
    assert any("pip install" in c and "korch" in c for c in raw["setup_commands"])


def test_onprem_is_local_provider_with_the_6_gpu_worker():
    from korch.cluster.plan import node_types

    raw = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    assert raw["provider"]["type"] == "local" and len(raw["provider"]["worker_ips"]) == 1
    types = {t.name: t for t in node_types(raw)}
    assert types["worker"].gpus == 6 and types["worker"].max_nodes == 1
    assert types["head"].gpus == 0


def _start_commands(raw: dict) -> list[str]:
    return list(raw.get("head_start_ray_commands", [])) + list(raw.get("worker_start_ray_commands", []))


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_yaml_keeps_dashboard_on_loopback_and_auth_on(path):
    raw = yaml.safe_load(path.read_text())
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for command in _start_commands(raw):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command
    # The token reaches every node through file_mounts, copied over SSH from the user's machine.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = path.read_text()
    for how in ("ray up", "ray attach", "ray dashboard", "ssh -L"):
        assert how in text, f"{path.name} should say how to start/reach it: {how}"


# --- KubeRay ---------------------------------------------------------------------------------------------

def _check_pod_template(template: dict, where: str) -> list[str]:
    problems = []
    containers = ((template or {}).get("spec") or {}).get("containers")
    if not containers:
        return [f"{where}.template.spec.containers is required"]
    for i, c in enumerate(containers):
        for key in ("name", "image"):
            if not c.get(key):
                problems.append(f"{where}.template.spec.containers[{i}].{key} is required")
    return problems


def kuberay_problems(doc: dict) -> list[str]:
    """Required fields of ray.io/v1 RayCluster and RayJob (what the CRD's openAPIV3Schema requires, plus the
    values the operator rejects at admission)."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion must be ray.io/v1")
    kind = doc.get("kind")
    if kind not in ("RayCluster", "RayJob"):
        return problems + [f"kind must be RayCluster or RayJob, got {kind!r}"]
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is required")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            problems.append("spec.entrypoint is required")
        if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"):
            problems.append("spec.submissionMode is not a KubeRay mode")
        if "runtimeEnvYAML" in spec:
            if not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
                problems.append("spec.runtimeEnvYAML must be a YAML mapping")
        if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
            problems.append("spec.rayClusterSpec (or clusterSelector) is required")
        spec = spec.get("rayClusterSpec") or {}
        where = "spec.rayClusterSpec"
    else:
        where = "spec"
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec is required"]
    problems += _check_pod_template(head.get("template"), f"{where}.headGroupSpec")
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        w = f"{where}.workerGroupSpecs[{i}]"
        if not group.get("groupName"):
            problems.append(f"{w}.groupName is required")
        problems += _check_pod_template(group.get("template"), w)
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not (0 <= lo <= n <= hi):
            problems.append(f"{w}: need 0 <= minReplicas <= replicas <= maxReplicas")
    for key, value in (head.get("rayStartParams") or {}).items():
        if not isinstance(value, str):
            problems.append(f"{where}.headGroupSpec.rayStartParams.{key} must be a string")
    return problems


@pytest.mark.parametrize("path", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_manifest_has_required_fields(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert kuberay_problems(doc) == []


def test_kuberay_check_catches_a_broken_manifest():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    del doc["spec"]["entrypoint"]
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")
    problems = kuberay_problems(doc)
    assert any("entrypoint" in p for p in problems) and any("image" in p for p in problems)


@pytest.mark.parametrize("path", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_dashboard_on_loopback_and_token_auth(path):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert spec["authOptions"]["mode"] == "token"
    assert "kubectl apply" in path.read_text() and "port-forward" in path.read_text()


def test_rayjob_entrypoint_runs_korch_against_its_cluster():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert re.match(r"^korch run jobs/\S+\.yaml --address auto\b", doc["spec"]["entrypoint"])
    # The submitter reaches the loopback-only job API from inside the head pod.
    assert doc["spec"]["submissionMode"] == "SidecarMode"


# --- no secrets, no auth-off advice ----------------------------------------------------------------------

SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",                       # AWS access key id
    r"aws_secret_access_key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"RAY_AUTH_TOKEN\s*[:=]\s*\S", r"auth_token\s*[:=]\s*['\"]?[0-9a-f]{16,}",
    r"\"type\":\s*\"service_account\"", r"ghp_[0-9A-Za-z]{20,}",
]


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_no_credentials_in_cluster_files(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{path.name} matches {pattern}"


def test_nothing_tells_users_to_disable_auth():
    files = list((REPO / "src" / "korch" / "cluster").rglob("*.py")) + ALL
    doc = REPO / "docs" / "cluster.md"
    if doc.exists():
        files.append(doc)
    for path in files:
        text = path.read_text()
        assert "RAY_AUTH_MODE=disabled" not in text, path
        assert "--dashboard-host=0.0.0.0" not in text and "dashboard-host: \"0.0.0.0\"" not in text, path
