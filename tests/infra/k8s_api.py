"""A small in-memory Kubernetes API for the backend tests: one namespace's Deployments and pods.

It answers what the Kubernetes backend uses, with the real API's paths, bodies and status codes:
GET/PATCH `/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`, GET
`/api/v1/namespaces/{ns}/pods?labelSelector=...`, PATCH and DELETE
`/api/v1/namespaces/{ns}/pods/{name}`.
PATCH takes the merge-patch and strategic-merge-patch content types (both merge maps the same way
for the fields used here) and honours `metadata.resourceVersion` with a 409 on a stale one.

A stand-in for the ReplicaSet controller keeps each Deployment's pods equal to its replicas after
every change: it names new pods `{deployment}-{n}` (Pending while `unschedulable` is set, as
with no free GPU, else Running), and on a scale-down deletes Pending pods first, then those with
the lowest `controller.kubernetes.io/pod-deletion-cost` (newest first among equals), as the real
one ranks them, so a test sees which pods a scale-down removed.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclass
class Pod:
    name: str
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    created: int = 0
    phase: str = "Running"

    def cost(self) -> int:
        return int(self.annotations.get(COST, "0"))


@dataclass
class Deployment:
    name: str
    replicas: int
    labels: dict[str, str]
    resource_version: int = 1
    next_pod: int = 0


@dataclass
class Request:
    method: str
    path: str
    content_type: str | None
    body: Any


class FakeKubernetesApi:
    def __init__(self, namespace: str = "sluice") -> None:
        self.namespace = namespace
        self.deployments: dict[str, Deployment] = {}
        self.pods: dict[str, Pod] = {}
        self.requests: list[Request] = []
        self.forbidden: set[tuple[str, str]] = set()  # (method, "scale" | "pods") answered 403
        # Replica changes made "by someone else" just before the next N scale PATCHes.
        self.interfering_patches = 0
        self.unschedulable = False  # new pods stay Pending
        self.lock = threading.Lock()
        self._clock = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api._handle(self, "GET")

            def do_PATCH(self) -> None:
                api._handle(self, "PATCH")

            def do_DELETE(self) -> None:
                api._handle(self, "DELETE")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeKubernetesApi:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- state -----------------------------------------------------------------------------

    def add_deployment(self, name: str, replicas: int) -> list[str]:
        """Creates a Deployment whose pods carry `app: {name}`; returns the pod names."""
        with self.lock:
            self.deployments[name] = Deployment(name, 0, {"app": name})
            self._set_replicas(self.deployments[name], replicas)
            return self.pod_names(name)

    def pod_names(self, deployment: str) -> list[str]:
        labels = self.deployments[deployment].labels
        return sorted(p.name for p in self.pods.values() if _matches(p.labels, labels))

    def _set_replicas(self, d: Deployment, replicas: int) -> None:
        d.replicas = replicas
        d.resource_version += 1
        mine = [p for p in self.pods.values() if _matches(p.labels, d.labels)]
        while len(mine) < replicas:
            self._clock += 1
            pod = Pod(f"{d.name}-{d.next_pod}", dict(d.labels), created=self._clock,
                      phase="Pending" if self.unschedulable else "Running")
            d.next_pod += 1
            self.pods[pod.name] = pod
            mine.append(pod)
        mine.sort(key=lambda p: (p.phase != "Pending", p.cost(), -p.created))
        for pod in mine[:max(0, len(mine) - replicas)]:
            del self.pods[pod.name]

    # -- HTTP ------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        content_type = h.headers.get("Content-Type")
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self.lock:
            self.requests.append(Request(method, url.path, content_type, body))
            status, reply = self._route(method, url.path, parse_qs(url.query), content_type, body)
        data = json.dumps(reply).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, query: dict[str, list[str]],
               content_type: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if method == "PATCH" and content_type not in PATCH_TYPES:
            return _status(415, "UnsupportedMediaType", f"content type {content_type}")
        if parts[:4] == ["apis", "apps", "v1", "namespaces"] and len(parts) == 8 \
                and parts[5] == "deployments" and parts[7] == "scale":
            return self._scale(method, parts[4], parts[6], body)
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5 and parts[4] == "pods":
            return self._pods(method, parts[3], parts[5] if len(parts) == 6 else None, query,
                              body)
        return _status(404, "NotFound", f"the server could not find the requested resource {path}")

    def _scale(self, method: str, ns: str, name: str, body: Any) -> tuple[int, dict[str, Any]]:
        if (method, "scale") in self.forbidden:
            return _forbidden(method, "deployments/scale", ns, name)
        d = self.deployments.get(name) if ns == self.namespace else None
        if d is None:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        if method == "PATCH":
            if self.interfering_patches > 0:
                self.interfering_patches -= 1
                self._set_replicas(d, d.replicas)  # a change that bumps the version
            version = (body.get("metadata") or {}).get("resourceVersion")
            if version is not None and version != str(d.resource_version):
                return _status(409, "Conflict", f'Operation cannot be fulfilled on '
                               f'deployments.apps "{name}": the object has been modified')
            replicas = (body.get("spec") or {}).get("replicas")
            if replicas is not None:
                self._set_replicas(d, int(replicas))
        return 200, {
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": name, "namespace": ns,
                         "resourceVersion": str(d.resource_version)},
            "spec": {"replicas": d.replicas},
            "status": {"replicas": len(self.pod_names(name)),
                       "selector": ",".join(f"{k}={v}" for k, v in d.labels.items())}}

    def _pods(self, method: str, ns: str, name: str | None, query: dict[str, list[str]],
              body: Any) -> tuple[int, dict[str, Any]]:
        if (method, "pods") in self.forbidden:
            return _forbidden(method, "pods", ns, name or "")
        if name is None and method == "GET":
            selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0]
                            .split(",") if kv)
            items = [_pod_json(p, ns) for p in sorted(self.pods.values(), key=lambda p: p.name)
                     if ns == self.namespace and _matches(p.labels, selector)]
            return 200, {"apiVersion": "v1", "kind": "PodList",
                         "metadata": {"resourceVersion": "1"}, "items": items}
        pod = self.pods.get(name or "") if ns == self.namespace else None
        if pod is None:
            return _status(404, "NotFound", f'pods "{name}" not found')
        if method == "DELETE":
            del self.pods[pod.name]
            for d in self.deployments.values():  # the ReplicaSet replaces it
                if _matches(pod.labels, d.labels):
                    self._set_replicas(d, d.replicas)
            return 200, _pod_json(pod, ns)
        if method == "PATCH":
            for key, value in ((body.get("metadata") or {}).get("annotations") or {}).items():
                if value is None:
                    pod.annotations.pop(key, None)
                else:
                    pod.annotations[key] = value
        return 200, _pod_json(pod, ns)


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_json(pod: Pod, ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": ns, "labels": pod.labels,
                         "annotations": pod.annotations},
            "status": {"phase": pod.phase}}


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}


def _forbidden(method: str, resource: str, ns: str, name: str) -> tuple[int, dict[str, Any]]:
    verb = {"GET": "get", "PATCH": "patch", "DELETE": "delete"}[method]
    return _status(403, "Forbidden", f'{resource} "{name}" is forbidden: User '
                   f'"system:serviceaccount:{ns}:default" cannot {verb} resource "{resource}" in '
                   f'API group "" in the namespace "{ns}"')
