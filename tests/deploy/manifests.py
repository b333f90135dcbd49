"""Reading the deployment artifacts in ``bentos/kubernetes`` (and ``bentos/bentocloud``) for the tests.

A folder with a ``kustomization.yaml`` is a Kustomize root; its manifests are the files it lists. The helpers
here only read; every check lives in the tests.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "bentos" / "kubernetes"
BENTOCLOUD = ROOT / "bentos" / "bentocloud" / "deployment.yaml"
DEFAULT_DEPLOYMENT = ROOT / "bentos" / "default.yaml"
SCRAPE_CONFIG = KUBERNETES / "prometheus" / "ftserve-scrape.yml"
# Custom resources kubernetes-validate has no schema for; checked field by field in the tests instead.
CRD_GROUPS = frozenset({"monitoring.coreos.com"})


@dataclass(frozen=True)
class Manifest:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(KUBERNETES)}:{self.kind}/{self.name}"

    @property
    def is_custom_resource(self) -> bool:
        return str(self.doc["apiVersion"]).split("/")[0] in CRD_GROUPS


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomize_roots() -> list[Path]:
    return sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))


def kustomization(root: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((root / "kustomization.yaml").read_text())
    return loaded


def listed_files(root: Path) -> list[Path]:
    """The files a kustomization lists as resources (directories, i.e. bases, are not followed)."""
    paths = [(root / entry).resolve() for entry in kustomization(root).get("resources", [])]
    return [p for p in paths if p.is_file()]


def manifests(roots: list[Path] | None = None) -> list[Manifest]:
    """Every document of every file listed by the given Kustomize roots (default: all of them)."""
    found = []
    for root in kustomize_roots() if roots is None else roots:
        for path in listed_files(root):
            found.extend(Manifest(path, doc) for doc in documents(path))
    return found


def base() -> list[Manifest]:
    """What `kubectl apply -k bentos/kubernetes` creates."""
    return manifests([KUBERNETES])


def find(kind: str, name: str, within: list[Manifest] | None = None) -> dict[str, Any]:
    hits = [m.doc for m in (manifests() if within is None else within) if m.kind == kind and m.name == name]
    if len(hits) != 1:
        raise LookupError(f"expected one {kind}/{name}, found {len(hits)}")
    return hits[0]


def containers(deployment: dict[str, Any], *, init: bool = False) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = spec.get("initContainers", []) if init else []
    return found + spec["containers"]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [c for c in containers(deployment, init=True) if c["name"] == name]
    if len(hits) != 1:
        raise LookupError(f"expected one container {name}, found {len(hits)}")
    return hits[0]


def port(container_: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in container_["ports"] if p["name"] == name))


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def env_values(container_: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet sets it: literal values, and resourceFieldRef values computed
    from its own resources (rounded up, as the kubelet does). Secret and field references are left out."""
    out = {}
    for var in container_.get("env", []):
        if "value" in var:
            out[var["name"]] = str(var["value"])
            continue
        ref = var.get("valueFrom", {}).get("resourceFieldRef")
        if ref is not None:
            section, resource = ref["resource"].split(".")
            amount = cpu_cores(container_["resources"][section][resource])
            out[var["name"]] = str(math.ceil(amount / cpu_cores(ref.get("divisor", "1"))))
    return out


def secret_env(container_: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Variables fed from Secrets: name -> (secret, key)."""
    refs = {}
    for var in container_.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs[var["name"]] = (ref["name"], ref["key"])
    return refs


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


# The service as BentoML builds it, in a child process: loading the service and BentoML's configuration sets
# process-wide state that other tests should not inherit. Reads BentoML 1.4's app factory (pinned in
# pyproject.toml): the HTTP routes a replica serves are BentoML's, not ours.
_INTROSPECT = """
import json
from ftserve.service.bento import FTServe
FTServe.inject_config()
from bentoml._internal.configuration.containers import BentoMLContainer
from _bentoml_impl.server.app import ServiceAppFactory
routes = [getattr(r, "path", None) for r in ServiceAppFactory(FTServe, is_main=True).routes]
mounts = [path for _, path, _ in FTServe.mount_apps]
print(json.dumps({"name": FTServe.name, "http_port": BentoMLContainer.http.port.get(), "routes": routes,
                  "mounts": mounts}))
"""


@functools.cache
def bentoml_service() -> dict[str, Any]:
    """{name, http_port, routes, mounts} of the BentoML service in src/ftserve/service/bento.py (loaded once)."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    done = subprocess.run([sys.executable, "-c", _INTROSPECT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"loading the BentoML service failed:\n{done.stderr[-3000:]}")
    loaded: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded
