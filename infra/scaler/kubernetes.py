"""Kubernetes backend: workers are the pods of one Deployment, sized through its scale subresource.

A Deployment cannot be told which pod to delete, so `remove` first marks the drained pods with a
very low `controller.kubernetes.io/pod-deletion-cost` and then lowers the replica count by as many:
the ReplicaSet controller deletes the cheapest pods among equals. Drained pods are also unready
(the readiness probe, `infra/probe.py`, passes only in state "ready") and unready pods go before
ready ones, so a ready worker is never chosen over a drained one. A worker's id is its pod name
(the manifest sets SLUICE_WORKER_ID from `metadata.name`).

The controller ranks pods that are still Pending (waiting for a GPU) before every running one,
cost or not, so a scale-down while some are pending removes those and keeps the drained pod. A
drained worker never serves again, so the backend follows up: a pod it removed that is still
there `settle_s` later is deleted outright, and the ReplicaSet replaces it with a fresh pod,
which keeps the count the scaler asked for.

Replica changes carry the scale's resourceVersion, so a concurrent change (a person running
`kubectl scale`) makes the patch fail with a conflict and the backend re-reads and retries instead
of overwriting it.

`kubernetes` is an optional dependency (`pip install 'sluice[kubernetes]'`), imported only here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("sluice.scaler.kubernetes")

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# Far below the default 0 of every other pod (the annotation is an int32).
DRAINED_POD_DELETION_COST = -1_000_000
# How long the ReplicaSet gets to delete the pods a scale-down was meant for.
DEFAULT_SETTLE_S = 15.0
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_CONFLICT_RETRIES = 5
# What the backend does to each resource, for messages on an RBAC denial.
_VERBS = {"deployments/scale": "get and patch", "pods": "get, list, patch and delete"}

T = TypeVar("T")


class KubernetesBackendError(RuntimeError):
    """The Kubernetes API refused or failed a request; the message says what to fix."""


class KubernetesConfigError(KubernetesBackendError):
    """No cluster credentials: neither in-cluster service account nor kubeconfig."""


class DeploymentNotFoundError(KubernetesBackendError):
    """The worker Deployment does not exist in the namespace."""


class KubernetesForbiddenError(KubernetesBackendError):
    """The credentials may not do what the backend needs (RBAC)."""


class KubernetesUnreachableError(KubernetesBackendError):
    """The Kubernetes API server did not answer."""


def _import_kubernetes() -> Any:
    try:
        import kubernetes
    except ImportError as e:
        raise KubernetesConfigError(
            "the Kubernetes backend needs the kubernetes client: pip install 'sluice[kubernetes]'"
        ) from e
    return kubernetes


def load_api_client(host: str | None = None) -> Any:
    """An ApiClient for `host` if given, else in-cluster config, else the kubeconfig."""
    _import_kubernetes()
    from kubernetes import client, config

    cfg = client.Configuration()
    if host is not None:
        cfg.host = host
        return client.ApiClient(cfg)
    try:
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    except config.ConfigException as in_cluster:
        try:
            # KUBECONFIG read now: the client reads it once, when first imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                    client_configuration=cfg)
        except (config.ConfigException, OSError) as e:
            raise KubernetesConfigError(
                "no Kubernetes credentials: not running in a pod with a service account "
                f"({in_cluster}) and no usable kubeconfig ({e}); run the scaler in the cluster "
                "(infra/k8s) or point KUBECONFIG at a kubeconfig file") from e
    return client.ApiClient(cfg)


def default_namespace() -> str:
    """The pod's own namespace when in a cluster, else "default"."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


class KubernetesBackend:
    """Sizes the worker Deployment `deployment` in `namespace`."""

    name = "kubernetes"

    def __init__(self, namespace: str | None, deployment: str, *, api_client: Any = None,
                 host: str | None = None, settle_s: float = DEFAULT_SETTLE_S) -> None:
        kubernetes = _import_kubernetes()
        self.namespace = namespace or default_namespace()
        self.deployment = deployment
        self._owns_client = api_client is None
        self._client = api_client if api_client is not None else load_api_client(host)
        self._apps = kubernetes.client.AppsV1Api(self._client)
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._api_exception = kubernetes.client.ApiException
        self._where = f"deployment {self.namespace}/{self.deployment}"
        self.settle_s = settle_s
        # Pods a scale-down was meant for -> when the count was lowered (monotonic seconds).
        self._leaving: dict[str, float] = {}

    # -- Backend ---------------------------------------------------------------------------

    def replicas(self) -> int:
        scale = self._read_scale()
        if self._leaving:
            self._delete_kept_pods(scale)
        # spec, not status: pods still pending (no free GPU yet) count as starting workers, or
        # the scaler would ask for them again on every tick.
        return int(scale.spec.replicas or 0)

    def scale_up(self, count: int) -> None:
        if count <= 0:
            return
        before, after = self._change_replicas(lambda n: n + count)
        log.info("%s: scaled up from %d to %d replicas", self._where, before, after)

    def remove(self, worker_ids: list[str]) -> None:
        wanted = list(dict.fromkeys(worker_ids))
        if not wanted:
            return
        pods = self._live_pods(self._read_scale())
        unknown = [w for w in wanted if w not in pods]
        if unknown:
            # Lowering the count for a worker that is not a live pod of this Deployment would
            # take away some other, undrained pod instead.
            log.warning("%s: no live pod named %s; not counted in the scale-down",
                        self._where, ", ".join(unknown))
        marked = [w for w in wanted if w in pods and self._mark_for_deletion(w)]
        if not marked:
            return
        before, after = self._change_replicas(lambda n: max(0, n - len(marked)))
        self._leaving.update(dict.fromkeys(marked, time.monotonic()))
        log.info("%s: removed drained pods %s (pod-deletion-cost %d), %d -> %d replicas",
                 self._where, ", ".join(marked), DRAINED_POD_DELETION_COST, before, after)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- API calls -------------------------------------------------------------------------

    def _read_scale(self) -> Any:
        return self._call("read the scale of", "deployments/scale",
                          self._apps.read_namespaced_deployment_scale, self.deployment,
                          self.namespace)

    def _change_replicas(self, new_count: Callable[[int], int]) -> tuple[int, int]:
        """Applies `new_count` to the current replicas, retrying on a concurrent change."""
        for _ in range(_CONFLICT_RETRIES):
            scale = self._read_scale()
            before = int(scale.spec.replicas or 0)
            after = new_count(before)
            if after == before:
                return before, after
            body = {"metadata": {"resourceVersion": scale.metadata.resource_version},
                    "spec": {"replicas": after}}
            try:
                self._call("patch the scale of", "deployments/scale",
                           self._apps.patch_namespaced_deployment_scale, self.deployment,
                           self.namespace, body)
            except _Conflict:
                log.info("%s: replicas changed meanwhile; reading them again", self._where)
                continue
            return before, after
        raise KubernetesBackendError(
            f"{self._where}: its replica count kept changing under the scaler "
            f"({_CONFLICT_RETRIES} conflicts in a row); is another autoscaler (an HPA or KEDA) "
            "sizing the same Deployment? Use one of them only")

    def _live_pods(self, scale: Any) -> set[str]:
        selector = scale.status.selector if scale.status is not None else None
        if not selector:
            raise KubernetesBackendError(
                f"{self._where}: its scale has no pod selector (status.selector); the "
                "Deployment has not been reconciled yet, or this is not an apps/v1 Deployment")
        pods = self._call("list the pods of", "pods", self._core.list_namespaced_pod,
                          self.namespace, label_selector=selector)
        return {p.metadata.name for p in pods.items if p.metadata.deletion_timestamp is None}

    def _delete_kept_pods(self, scale: Any) -> None:
        """Deletes removed pods the ReplicaSet kept past `settle_s` (it took pending ones)."""
        live = self._live_pods(scale)
        now = time.monotonic()
        for pod, since in list(self._leaving.items()):
            if pod not in live:
                del self._leaving[pod]
            elif now - since >= self.settle_s:
                log.warning("%s: the ReplicaSet kept drained pod %s (it deleted pending pods "
                            "first); deleting it", self._where, pod)
                with contextlib.suppress(_PodGone):  # gone meanwhile: what we wanted
                    self._call("delete a pod of", "pods", self._core.delete_namespaced_pod,
                               pod, self.namespace)
                del self._leaving[pod]

    def _mark_for_deletion(self, pod: str) -> bool:
        """Makes `pod` the first one its ReplicaSet deletes; False when it is already gone."""
        body = {"metadata": {"annotations": {DELETION_COST_ANNOTATION:
                                             str(DRAINED_POD_DELETION_COST)}}}
        try:
            self._call("annotate a pod of", "pods", self._core.patch_namespaced_pod, pod,
                       self.namespace, body)
        except _PodGone:
            log.warning("%s: pod %s went away before it was marked", self._where, pod)
            return False
        return True

    def _call(self, action: str, resource: str, fn: Callable[..., T], *args: Any,
              **kwargs: Any) -> T:
        import urllib3

        try:
            return fn(*args, **kwargs)
        except self._api_exception as e:
            raise self._translate(e, action, resource) from e
        except urllib3.exceptions.HTTPError as e:
            host = self._client.configuration.host
            raise KubernetesUnreachableError(
                f"cannot reach the Kubernetes API at {host} to {action} {self._where}: {e}") from e

    def _translate(self, e: Any, action: str, resource: str) -> Exception:
        status = int(e.status or 0)
        detail = _status_message(e)
        if status == 409:
            return _Conflict(detail)
        if status == 404 and resource == "pods":
            return _PodGone(detail)
        if status == 404:
            return DeploymentNotFoundError(
                f"{self._where} not found ({detail}): apply the manifests (kubectl apply -k "
                "infra/k8s) or name the worker Deployment and its namespace correctly")
        if status in (401, 403):
            return KubernetesForbiddenError(
                f"not allowed to {action} {self._where} ({detail}): the scaler's service account "
                f"needs {_VERBS[resource]} on {resource} in namespace {self.namespace!r}; apply the Role "
                "and RoleBinding of infra/k8s/base/scaler.yaml")
        return KubernetesBackendError(
            f"could not {action} {self._where}: HTTP {status} {e.reason or ''} ({detail})")


class _Conflict(KubernetesBackendError):
    """409: the object changed since it was read."""


class _PodGone(KubernetesBackendError):
    """404 on a pod: it was deleted after the pod list was read."""


def _status_message(e: Any) -> str:
    """The API server's own explanation from a Status body, else the HTTP reason."""
    try:
        message = json.loads(e.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or e.reason or f"HTTP {e.status}")
