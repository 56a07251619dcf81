"""The Kubernetes backend, through the official client, against an in-memory API server."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from k8s_api import COST, PATCH_TYPES, FakeKubernetesApi

from infra.scaler import kubernetes as kubernetes_backend
from infra.scaler.backend import Backend
from infra.scaler.kubernetes import (
    DRAINED_POD_DELETION_COST,
    DeploymentNotFoundError,
    KubernetesBackend,
    KubernetesBackendError,
    KubernetesConfigError,
    KubernetesForbiddenError,
    KubernetesUnreachableError,
)
from infra.scaler.loop import ScalerLoop
from infra.scaler.policy import PolicyConfig
from shared import names

NS, WORKERS = "sluice", "sluice-worker"


@pytest.fixture
def api() -> Iterator[FakeKubernetesApi]:
    server = FakeKubernetesApi(NS).start()
    yield server
    server.stop()


@pytest.fixture
def backend(api: FakeKubernetesApi) -> Iterator[KubernetesBackend]:
    b = KubernetesBackend(NS, WORKERS, host=api.url)
    yield b
    b.close()


def test_is_a_backend(backend: KubernetesBackend) -> None:
    b: Backend = backend
    assert b.name == "kubernetes"


def test_replicas_reads_the_scale_subresource(api: FakeKubernetesApi,
                                              backend: KubernetesBackend) -> None:
    api.add_deployment(WORKERS, 3)
    assert backend.replicas() == 3
    assert api.requests[-1].method == "GET"
    assert api.requests[-1].path == f"/apis/apps/v1/namespaces/{NS}/deployments/{WORKERS}/scale"


def test_scale_up_patches_replicas(api: FakeKubernetesApi, backend: KubernetesBackend) -> None:
    api.add_deployment(WORKERS, 0)
    backend.scale_up(2)
    backend.scale_up(1)
    assert backend.replicas() == 3
    assert api.deployments[WORKERS].replicas == 3
    patches = [r for r in api.requests if r.method == "PATCH"]
    assert [p.body["spec"]["replicas"] for p in patches] == [2, 3]
    assert all(p.content_type in PATCH_TYPES for p in patches)
    # Every change names the version it was computed from.
    assert all(p.body["metadata"]["resourceVersion"] for p in patches)


def test_scale_up_by_zero_changes_nothing(api: FakeKubernetesApi,
                                          backend: KubernetesBackend) -> None:
    api.add_deployment(WORKERS, 1)
    backend.scale_up(0)
    assert not [r for r in api.requests if r.method == "PATCH"]


def test_remove_takes_exactly_the_drained_pods(api: FakeKubernetesApi,
                                               backend: KubernetesBackend) -> None:
    pods = api.add_deployment(WORKERS, 4)
    drained = [pods[0], pods[2]]  # the oldest pods: without the cost, the newest would go
    backend.remove(drained)
    assert api.deployments[WORKERS].replicas == 2
    assert api.pod_names(WORKERS) == [pods[1], pods[3]]
    annotations = [r for r in api.requests if r.method == "PATCH" and "/pods/" in r.path]
    assert sorted(r.path.rsplit("/", 1)[1] for r in annotations) == sorted(drained)
    assert all(r.body["metadata"]["annotations"][COST] == str(DRAINED_POD_DELETION_COST)
               for r in annotations)
    # The pods are marked before the count drops, so the controller already sees the costs.
    kinds = ["pod" if "/pods/" in r.path else "scale" for r in api.requests if r.method == "PATCH"]
    assert kinds == ["pod", "pod", "scale"]
    backend.settle_s = 0.0
    assert backend.replicas() == 2  # the ReplicaSet took the right pods: nothing to follow up
    assert not [r for r in api.requests if r.method == "DELETE"]


def test_drained_pod_kept_for_a_pending_one_is_deleted(api: FakeKubernetesApi) -> None:
    """The ReplicaSet deletes Pending pods before any running one, whatever their cost."""
    ready = api.add_deployment(WORKERS, 2)
    backend = KubernetesBackend(NS, WORKERS, host=api.url, settle_s=60.0)
    api.unschedulable = True  # no free GPU: the next pod waits
    backend.scale_up(1)
    assert len(set(api.pod_names(WORKERS)) - set(ready)) == 1  # the pending one
    backend.remove([ready[0]])
    assert api.pod_names(WORKERS) == ready  # the pending pod went, the drained one stayed
    assert backend.replicas() == 2
    assert not [r for r in api.requests if r.method == "DELETE"]  # within settle_s
    backend.settle_s = 0.0
    api.unschedulable = False
    assert backend.replicas() == 2
    (deleted,) = [r.path for r in api.requests if r.method == "DELETE"]
    assert deleted == f"/api/v1/namespaces/{NS}/pods/{ready[0]}"
    pods = api.pod_names(WORKERS)
    assert ready[0] not in pods and ready[1] in pods and len(pods) == 2
    backend.replicas()  # followed up once, then forgotten
    assert len([r for r in api.requests if r.method == "DELETE"]) == 1
    backend.close()


def test_remove_skips_ids_that_are_no_pod_of_the_deployment(
        api: FakeKubernetesApi, backend: KubernetesBackend,
        caplog: pytest.LogCaptureFixture) -> None:
    pods = api.add_deployment(WORKERS, 3)
    api.add_deployment("other", 1)
    with caplog.at_level(logging.WARNING):
        backend.remove([pods[1], "other-0", "laptop-1234-abc", pods[1]])
    # Only the one real pod counts: lowering by more would take an undrained worker.
    assert api.deployments[WORKERS].replicas == 2
    assert api.pod_names(WORKERS) == [pods[0], pods[2]]
    assert api.pod_names("other") == ["other-0"]
    assert "other-0" in caplog.text and "laptop-1234-abc" in caplog.text


def test_remove_of_nothing_known_leaves_replicas(api: FakeKubernetesApi,
                                                 backend: KubernetesBackend) -> None:
    api.add_deployment(WORKERS, 2)
    backend.remove(["gone-pod"])
    backend.remove([])
    assert api.deployments[WORKERS].replicas == 2
    assert not [r for r in api.requests if r.method == "PATCH"]


def test_conflict_rereads_and_retries(api: FakeKubernetesApi, backend: KubernetesBackend) -> None:
    api.add_deployment(WORKERS, 1)
    api.interfering_patches = 2
    backend.scale_up(1)
    assert api.deployments[WORKERS].replicas == 2
    assert len([r for r in api.requests if r.method == "PATCH"]) == 3


def test_endless_conflicts_raise(api: FakeKubernetesApi, backend: KubernetesBackend) -> None:
    api.add_deployment(WORKERS, 1)
    api.interfering_patches = 100
    with pytest.raises(KubernetesBackendError, match="another autoscaler"):
        backend.scale_up(1)


def test_missing_deployment_says_what_to_do(api: FakeKubernetesApi,
                                            backend: KubernetesBackend) -> None:
    with pytest.raises(DeploymentNotFoundError, match=f"{NS}/{WORKERS}.*kubectl apply -k"):
        backend.replicas()


@pytest.mark.parametrize(("method", "resource", "call"), [
    ("GET", "scale", lambda b, pods: b.replicas()),
    ("PATCH", "scale", lambda b, pods: b.scale_up(1)),
    ("PATCH", "pods", lambda b, pods: b.remove(pods[:1])),
])
def test_forbidden_names_the_missing_permission(api: FakeKubernetesApi,
                                                backend: KubernetesBackend, method: str,
                                                resource: str,
                                                call: Callable[[KubernetesBackend, list[str]], None]) -> None:
    pods = api.add_deployment(WORKERS, 2)
    api.forbidden.add((method, resource))
    with pytest.raises(KubernetesForbiddenError, match=r"infra/k8s/base/scaler\.yaml") as e:
        call(backend, pods)
    assert "is forbidden" in str(e.value)  # the server's own words travel along
    assert api.deployments[WORKERS].replicas == 2


def test_unreachable_api_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = KubernetesBackend(NS, WORKERS, host=f"http://127.0.0.1:{port}")
    with pytest.raises(KubernetesUnreachableError, match=f"127.0.0.1:{port}"):
        backend.replicas()
    backend.close()


# -- driven by the scaler's control loop ---------------------------------------------------


class Kubelet:
    """Plays the worker pods: a heartbeat per pod of the fake API, drained when told to."""

    def __init__(self, client: redis.Redis, api: FakeKubernetesApi) -> None:
        self.client, self.api = client, api
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.running: dict[str, int] = {}
        self.states: dict[str, str] = {}

    def sync(self) -> None:
        pods = set(self.api.pod_names(WORKERS))
        for pod in pods - set(self.states):
            self.pubsub.subscribe(names.worker_control(pod))
            self.states[pod] = "ready"
        while (message := self.pubsub.get_message(timeout=0.05)) is not None:
            pod = message["channel"].decode().rsplit(":", 1)[1]
            self.states[pod] = "drained"
        for pod, state in list(self.states.items()):
            if pod not in pods:  # its pod was deleted: the worker is gone
                del self.states[pod]
                self.client.hdel(names.WORKERS, pod)
                continue
            beat = {"worker_id": pod, "model": MODEL, "state": state, "kv_usage": 0.0,
                    "running": self.running.get(pod, 0), "waiting": 0, "active": 0,
                    "expires": time.time() + 30}
            self.client.hset(names.WORKERS, pod, json.dumps(beat))


MODEL = "tiny"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_loop_starts_a_pod_for_a_job_queued_at_zero(api: FakeKubernetesApi,
                                                    backend: KubernetesBackend,
                                                    client: redis.Redis) -> None:
    api.add_deployment(WORKERS, 0)
    client.xadd(names.queue(MODEL), {names.JOB_FIELD: "{}"})
    loop = ScalerLoop(client, MODEL, backend, PolicyConfig(min_workers=0, max_workers=2))
    loop.step()
    assert api.deployments[WORKERS].replicas == 1
    assert len(api.pod_names(WORKERS)) == 1


def test_loop_drains_an_idle_pod_and_only_that_pod_goes(api: FakeKubernetesApi,
                                                        backend: KubernetesBackend,
                                                        client: redis.Redis) -> None:
    idle, busy = api.add_deployment(WORKERS, 2)  # left to itself the ReplicaSet takes `busy`
    kubelet = Kubelet(client, api)
    kubelet.running[busy] = 1
    kubelet.sync()
    loop = ScalerLoop(client, MODEL, backend,
                      PolicyConfig(min_workers=0, max_workers=2, stabilization_s=0))
    for _ in range(5):
        loop.step()
        kubelet.sync()
        if api.deployments[WORKERS].replicas == 1:
            break
    assert kubelet.states == {busy: "ready"}
    assert api.pod_names(WORKERS) == [busy]
    pod_patches = [r.path.rsplit("/", 1)[1] for r in api.requests
                   if r.method == "PATCH" and "/pods/" in r.path]
    assert pod_patches == [idle]


# -- credentials -----------------------------------------------------------------------------


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "scaler", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "scaler"}}]}))
    return path


def test_outside_a_cluster_the_kubeconfig_is_used(api: FakeKubernetesApi, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "config", api.url)))
    api.add_deployment(WORKERS, 2)
    backend = KubernetesBackend(NS, WORKERS)
    assert backend.replicas() == 2
    backend.close()


def test_no_credentials_says_how_to_provide_them(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(KubernetesConfigError, match="KUBECONFIG"):
        KubernetesBackend(NS, WORKERS)


def test_sluice_scaler_process_sizes_the_deployment(api: FakeKubernetesApi, redis_url: str,
                                                   client: redis.Redis, tmp_path: Path) -> None:
    """`sluice scaler --backend kubernetes` as the scaler pod runs it, credentials from a
    kubeconfig: a job queued at zero workers makes it patch the Deployment to one replica."""
    api.add_deployment(WORKERS, 0)
    env = {**os.environ, "KUBECONFIG": str(write_kubeconfig(tmp_path / "config", api.url))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "scaler", "--backend", "kubernetes",
         "--namespace", NS, "--deployment", WORKERS, "--model", MODEL, "--redis-url", redis_url,
         "--interval", "0.2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        client.xadd(names.queue(MODEL), {names.JOB_FIELD: "{}"})
        deadline = time.monotonic() + 60
        while api.deployments[WORKERS].replicas == 0 and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api.deployments[WORKERS].replicas == 1
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "scaled up from 0 to 1" in output


def test_namespace_defaults_to_the_pods_own(api: FakeKubernetesApi, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    token_dir = tmp_path / "serviceaccount"
    token_dir.mkdir()
    (token_dir / "namespace").write_text(NS)
    monkeypatch.setattr(kubernetes_backend, "SERVICE_ACCOUNT_NAMESPACE", token_dir / "namespace")
    api.add_deployment(WORKERS, 1)
    backend = KubernetesBackend(None, WORKERS, host=api.url)
    assert backend.namespace == NS and backend.replicas() == 1
    backend.close()
    monkeypatch.setattr(kubernetes_backend, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "missing")
    assert KubernetesBackend(None, WORKERS, host=api.url).namespace == "default"
