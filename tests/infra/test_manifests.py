"""The Kubernetes manifests (infra/k8s): valid against the schemas, and consistent with the code.

Core kinds are checked by kubernetes-validate against the bundled OpenAPI schemas of one pinned
Kubernetes version in strict mode (unknown fields fail). CRD kinds (ServiceMonitor, ScaledObject)
are not in those schemas and are checked against tests/infra/schemas/, which describe the fields
used. Where kubectl is installed, each kustomization is also rendered and its output checked.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from infra.probe import build_parser as build_probe_parser
from shared import names
from shared.settings import GatewaySettings, ScalerSettings, WorkerSettings, load_settings
from worker.models.registry import CACHE_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.31"
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
               ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json"}
KUSTOMIZATIONS = [K8S, K8S / "base", K8S / "keda", K8S / "monitoring"]
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings, "worker": WorkerSettings, "scaler": ScalerSettings}

Doc = dict[str, Any]


def load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
DOCS = [(p, d) for p in MANIFESTS for d in load_all(p)]
BASE = [d for p, d in DOCS if p.parent == K8S / "base"]


def validate(doc: Doc) -> None:
    schema_file = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    else:
        schema = json.loads((SCHEMAS / schema_file).read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)


def find(kind: str, name: str, docs: list[Doc] = BASE) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(deployment: Doc) -> Doc:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


@pytest.mark.parametrize(("path", "doc"), DOCS,
                         ids=[f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}"
                              for p, d in DOCS])
def test_manifest_matches_its_schema(path: Path, doc: Doc) -> None:
    validate(doc)


def test_validation_rejects_mistakes() -> None:
    """The checks above would catch a misspelled field, a wrong type or a missing field."""
    worker = copy.deepcopy(find("Deployment", "sluice-worker"))
    container(worker)["readinessprobe"] = container(worker).pop("readinessProbe")
    gateway = copy.deepcopy(find("Deployment", "sluice-gateway"))
    container(gateway)["ports"][0]["containerPort"] = "8000"
    hpa = copy.deepcopy(find("HorizontalPodAutoscaler", "sluice-gateway"))
    del hpa["spec"]["maxReplicas"]
    (keda_path,) = [p for p in MANIFESTS if p.parent.name == "keda"]
    scaled = load_all(keda_path)[0]
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 16  # KEDA wants strings
    monitor = copy.deepcopy(next(d for _, d in DOCS if d["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    for broken in (worker, gateway, hpa, scaled, monitor):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


# -- kustomizations ------------------------------------------------------------------------


def kustomization(directory: Path) -> Doc:
    doc: Doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def test_every_manifest_is_in_a_kustomization() -> None:
    listed: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        for resource in kustomization(directory)["resources"]:
            target = (directory / resource).resolve()
            assert target.exists(), f"{directory}/kustomization.yaml lists missing {resource}"
            if target.is_file():
                listed.add(target)
    assert listed == {p.resolve() for p in MANIFESTS}


def test_keda_overlay_deletes_the_scaler_and_names_the_model() -> None:
    patches = [yaml.safe_load(p["patch"]) for p in kustomization(K8S / "keda")["patches"]]
    deleted = {(p["kind"], p["metadata"]["name"]) for p in patches if p.get("$patch") == "delete"}
    scaler_parts = {(d["kind"], d["metadata"]["name"]) for p, d in DOCS
                    if p.name == "scaler.yaml"}
    assert deleted == scaler_parts
    (config,) = [p for p in patches if p["kind"] == "ConfigMap"]
    find("ConfigMap", config["metadata"]["name"])  # patches an object the base has
    (model,) = config["data"]["SLUICE_MODELS"].split(",")
    (scaled,) = [d for _, d in DOCS if d["kind"] == "ScaledObject"]
    triggers = [t["metadata"] for t in scaled["spec"]["triggers"]]
    assert {t["type"] for t in scaled["spec"]["triggers"]} == {"redis-streams"}
    redis_service = find("Service", "redis")["metadata"]["name"]
    for meta in triggers:
        assert meta["stream"] == names.queue(model)
        assert meta["consumerGroup"] == names.WORKER_GROUP
        assert meta["address"].startswith(f"{redis_service}.sluice.svc")
    # Lag (unread jobs) wakes the first worker: the pending list is empty without workers.
    # Pending (jobs held) keeps workers while they run and wakes one for a dead worker's jobs.
    # KEDA picks the measure by which key is set, so each trigger sets exactly one.
    measures = [{"lagCount", "pendingEntriesCount", "streamLength"} & set(m) for m in triggers]
    assert sorted(map(sorted, measures)) == [["lagCount"], ["pendingEntriesCount"]]
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["scaleTargetRef"]["name"] == "sluice-worker"


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (for `kubectl kustomize`) is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(K8S)) or ".")
def test_kustomization_renders_valid_objects(directory: Path) -> None:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    for doc in docs:
        validate(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "sluice"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "sluice-worker") in kinds
    assert (("Deployment", "sluice-scaler") in kinds) == (directory.name != "keda")
    assert (("ScaledObject", "sluice-worker") in kinds) == (directory.name == "keda")
    assert any(k == "ServiceMonitor" for k, _ in kinds) == (directory.name == "monitoring")


# -- consistency with the code -------------------------------------------------------------


def test_sluice_variables_name_real_settings() -> None:
    """A renamed setting cannot leave a manifest setting a variable nobody reads."""
    def fields(cls: type[BaseSettings]) -> set[str]:
        return {f"SLUICE_{f.upper()}" for f in cls.model_fields}

    known = set.union(*(fields(c) for c in SETTINGS.values())) | {CACHE_DIR_ENV}
    config = find("ConfigMap", "sluice-config")["data"]
    assert {k for k in config if k.startswith("SLUICE_")} <= known
    for process, cls in SETTINGS.items():
        c = container(find("Deployment", f"sluice-{process}"))
        assert c["command"] == ["sluice", process]
        assert {"name": "sluice-config"} in [e["configMapRef"] for e in c["envFrom"]]
        assert {k for k in env(c) if k.startswith("SLUICE_")} <= fields(cls)


# What the downward API and the Secret would fill in.
FIELD_VALUES = {"metadata.name": "sluice-worker-7d9f8c6b5-x2kqp", "metadata.namespace": "sluice"}
SECRET_VALUE = "sk-test-key"


@pytest.mark.parametrize("process", SETTINGS)
def test_each_process_accepts_its_environment(process: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings each pod would get pass that process's validation at start-up."""
    for key in [k for k in os.environ if k.startswith("SLUICE_")]:
        monkeypatch.delenv(key)
    c = container(find("Deployment", f"sluice-{process}"))
    values = dict(find("ConfigMap", "sluice-config")["data"])
    for name, var in env(c).items():
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            values[name] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            values[name] = SECRET_VALUE
        else:
            values[name] = var["value"]
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(SETTINGS[process])
    if isinstance(settings, WorkerSettings):
        assert settings.worker_id == FIELD_VALUES["metadata.name"]
    if isinstance(settings, ScalerSettings):
        assert settings.namespace == "sluice" and settings.backend == "kubernetes"


def test_services_and_budgets_select_pods_and_ports_exist() -> None:
    templates = [d["spec"]["template"] for d in BASE if d["kind"] in ("Deployment", "StatefulSet")]

    def pod_of(selector: dict[str, str]) -> Doc:
        (pod,) = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        return pod

    for svc in (d for d in BASE if d["kind"] == "Service"):
        pod = pod_of(svc["spec"]["selector"])
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, svc["metadata"]["name"]
    budgets = [d for d in BASE if d["kind"] == "PodDisruptionBudget"]
    assert {pod_of(b["spec"]["selector"]["matchLabels"])["metadata"]["labels"][
        "app.kubernetes.io/component"] for b in budgets} == {"worker", "gateway"}


def test_worker_pod() -> None:
    worker = find("Deployment", "sluice-worker")
    assert "replicas" not in worker["spec"]  # the scaler owns it; apply must not reset it
    pod = worker["spec"]["template"]["spec"]
    c = container(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Worker id = pod name, which is what the Kubernetes backend removes.
    assert env(c)["SLUICE_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    probes = {kind: c[kind]["exec"]["command"]
              for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for command in probes.values():
        assert command[:3] == ["python", "-m", "infra.probe"]
        build_probe_parser().parse_args(command[3:])  # flags the probe knows
    assert probes["readinessProbe"][3:] == []  # ready means state "ready"
    assert probes["startupProbe"][3:] == ["--alive"]
    assert probes["livenessProbe"][3:] == ["--alive", "--redis-down-ok"]
    metrics_port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert env(c)["SLUICE_METRICS_PORT"]["value"] == str(metrics_port)
    assert pod["terminationGracePeriodSeconds"] >= 300  # room to finish requests when draining


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = find("StatefulSet", "redis")
    c = container(redis)
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    data_dir = args[args.index("--dir") + 1]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == data_dir]
    claims = [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]]
    assert mount["name"] in claims
    url = find("ConfigMap", "sluice-config")["data"]["SLUICE_REDIS_URL"]
    assert url.startswith(f"redis://{find('Service', 'redis')['metadata']['name']}:6379/")


def test_gateway_scales_on_cpu() -> None:
    gateway = find("Deployment", "sluice-gateway")
    assert "replicas" not in gateway["spec"]  # the HPA owns it
    c = container(gateway)
    assert env(c)["SLUICE_PORT"]["value"] == str(c["ports"][0]["containerPort"])
    assert c["resources"]["requests"]["cpu"]  # utilization is relative to the request
    hpa = find("HorizontalPodAutoscaler", "sluice-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "sluice-gateway"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_scaler_may_do_what_the_kubernetes_backend_does() -> None:
    scaler = find("Deployment", "sluice-scaler")
    assert scaler["spec"]["replicas"] == 1 and scaler["spec"]["strategy"]["type"] == "Recreate"
    c = container(scaler)
    assert env(c)["SLUICE_BACKEND"]["value"] == "kubernetes"
    target = env(c)["SLUICE_DEPLOYMENT"]["value"]
    find("Deployment", target)
    account = scaler["spec"]["template"]["spec"]["serviceAccountName"]
    find("ServiceAccount", account)
    binding = find("RoleBinding", "sluice-scaler")
    assert {"kind": "ServiceAccount", "name": account, "namespace": "sluice"} in binding["subjects"]
    role = find(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]
              if target in rule.get("resourceNames", [target])}
    needed = {("apps", "deployments/scale", "get"), ("apps", "deployments/scale", "patch"),
              ("", "pods", "list"), ("", "pods", "patch"), ("", "pods", "delete")}
    assert needed <= grants
