"""The Kubernetes manifests in bentos/kubernetes: valid against Kubernetes' own schemas, and tied to the code
they deploy (ports, probe paths, the deployment file, settings the service reads from its environment, the
router's options), so that a change on either side fails here rather than in a cluster."""

from __future__ import annotations

import asyncio
import copy
import math
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from ftserve.cli import build_parser, validated
from ftserve.config import ServiceConfig, load_service_config
from ftserve.router.app import build_app
from ftserve.router.settings import RouterConfig
from tests.deploy import manifests as m

# The oldest Kubernetes these manifests need (preStop `sleep` is on by default from 1.30) and the newest whose
# schemas kubernetes-validate bundles. Both are checked; strict mode rejects fields a version does not know.
KUBERNETES_VERSIONS = ("1.30", "1.37")
COREDNS_TTL_S = 5  # CoreDNS' kubernetes plugin default: how stale a headless Service's answer may be
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "namespace", "labels", "patches"}


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return m.bentoml_service()


@pytest.fixture()
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ServiceConfig:
    """The settings an ftserve pod resolves: the ConfigMap's file plus the container's environment."""
    deployment = m.find("Deployment", "ftserve")
    configmap = m.find("ConfigMap", "ftserve-config")
    for name in [n for n in os.environ if n.startswith("FTSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in m.env_values(m.container(deployment, "ftserve")).items():
        if name.startswith("FTSERVE_"):  # what the settings read (FTSERVE_HOME, FTSERVE_<SECTION>__<KEY>)
            monkeypatch.setenv(name, value)
    file = tmp_path / "deployment.yaml"
    file.write_text(configmap["data"]["deployment.yaml"])
    return load_service_config(file)


def _router_config() -> RouterConfig:
    router = m.container(m.find("Deployment", "ftserve-router"), "router")
    assert router["command"] == ["python", "-m", "ftserve.cli"]
    settings: RouterConfig = validated(RouterConfig, build_parser().parse_args(router["args"]), "router")
    return settings


# -- schemas -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", [x for x in m.manifests() if not x.is_custom_resource], ids=lambda x: x.id)
def test_manifest_validates_strictly_against_the_kubernetes_schema(manifest: m.Manifest, version: str) -> None:
    assert kubernetes_validate.validate(manifest.doc, version, strict=True) == version


@pytest.mark.parametrize("manifest", [x for x in m.manifests() if x.is_custom_resource], ids=lambda x: x.id)
def test_custom_resources_have_no_bundled_schema_and_are_checked_by_hand(manifest: m.Manifest) -> None:
    # If kubernetes-validate ever ships these schemas, validate them like the rest instead.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(manifest.doc, KUBERNETES_VERSIONS[-1], strict=True)
    assert manifest.doc["metadata"]["name"] and manifest.doc["spec"]


def test_strict_validation_rejects_a_misspelled_field() -> None:
    deployment = copy.deepcopy(m.find("Deployment", "ftserve"))
    main = m.container(deployment, "ftserve")
    main["readinesProbe"] = main.pop("readinessProbe")  # without strict field validation: no readiness probe
    version = KUBERNETES_VERSIONS[-1]
    assert kubernetes_validate.validate(deployment, version, strict=False) == version  # lax mode lets it pass
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, version, strict=True)


# -- Kustomize ---------------------------------------------------------------------------------------------


def test_each_kustomization_lists_every_manifest_of_its_folder_and_nothing_missing() -> None:
    roots = m.kustomize_roots()
    assert m.KUBERNETES in roots
    for root in roots:
        k = m.kustomization(root)
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
        assert set(k) <= KUSTOMIZATION_KEYS, f"{root}: unexpected keys {set(k) - KUSTOMIZATION_KEYS}"
        for entry in k["resources"]:
            target = root / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{root}: {entry} is missing"
        on_disk = {p.resolve() for p in root.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert on_disk == set(m.listed_files(root)), f"{root}: listed and present manifests differ"


def test_every_yaml_file_is_a_listed_manifest_or_the_scrape_config() -> None:
    listed = {p for root in m.kustomize_roots() for p in m.listed_files(root)}
    listed |= {(root / "kustomization.yaml").resolve() for root in m.kustomize_roots()}
    present = {p.resolve() for p in m.KUBERNETES.rglob("*.y*ml")}
    assert present - listed == {m.SCRAPE_CONFIG.resolve()}


def test_manifests_name_no_namespace() -> None:
    for manifest in m.manifests():
        assert manifest.kind != "Namespace", manifest.id
        assert "namespace" not in manifest.doc["metadata"], f"{manifest.id} pins a namespace"


def test_every_image_is_set_through_the_kustomization() -> None:
    names = {entry["name"] for entry in m.kustomization(m.KUBERNETES)["images"]}
    for manifest in m.base():
        if manifest.kind == "Deployment":
            for c in m.containers(manifest.doc, init=True):
                assert c["image"] in names, f"{manifest.id}: image {c['image']!r} is not in kustomization images"


# -- labels and selectors ----------------------------------------------------------------------------------


def test_deployment_selectors_match_their_own_pods_and_not_each_others() -> None:
    server, router = m.find("Deployment", "ftserve"), m.find("Deployment", "ftserve-router")
    for deployment in (server, router):
        assert m.selects(deployment["spec"]["selector"]["matchLabels"], m.pod_labels(deployment))
    assert not m.selects(server["spec"]["selector"]["matchLabels"], m.pod_labels(router))
    assert not m.selects(router["spec"]["selector"]["matchLabels"], m.pod_labels(server))


@pytest.mark.parametrize(
    ("kind", "name", "target"),
    [
        ("Service", "ftserve", "ftserve"),
        ("Service", "ftserve-replicas", "ftserve"),
        ("Service", "ftserve-router", "ftserve-router"),
        ("PodDisruptionBudget", "ftserve", "ftserve"),
        ("PodDisruptionBudget", "ftserve-router", "ftserve-router"),
    ],
)
def test_selector_picks_exactly_its_deployments_pods(kind: str, name: str, target: str) -> None:
    doc = m.find(kind, name)
    selector = doc["spec"]["selector"]
    selector = selector.get("matchLabels", selector)
    picked = [x.name for x in m.base() if x.kind == "Deployment" and m.selects(selector, m.pod_labels(x.doc))]
    assert picked == [target]


def test_service_ports_reach_named_container_ports() -> None:
    for name, deployment, container in [
        ("ftserve", "ftserve", "ftserve"),
        ("ftserve-replicas", "ftserve", "ftserve"),
        ("ftserve-router", "ftserve-router", "router"),
    ]:
        target = m.container(m.find("Deployment", deployment), container)
        named = {p["name"] for p in target["ports"]}
        for service_port in m.find("Service", name)["spec"]["ports"]:
            assert service_port["targetPort"] in named, f"Service {name}: no container port {service_port}"


def test_the_autoscaler_owns_the_replica_count() -> None:
    hpa = m.find("HorizontalPodAutoscaler", "ftserve")
    target = hpa["spec"]["scaleTargetRef"]
    deployment = m.find(target["kind"], target["name"])
    assert target["apiVersion"] == "apps/v1"
    assert "replicas" not in deployment["spec"], "kubectl apply would reset the autoscaler's count"
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = m.find("PodDisruptionBudget", target["name"])
    assert pdb["spec"]["maxUnavailable"] >= 1, "a drain must be able to take a replica"


# -- the service: ports, probes, settings ------------------------------------------------------------------


def test_ports_are_the_services_defaults(service: dict[str, Any], config: ServiceConfig) -> None:
    main = m.container(m.find("Deployment", "ftserve"), "ftserve")
    args = main["args"]
    assert m.port(main, "http") == service["http_port"] == int(args[args.index("--port") + 1])
    assert m.port(main, "grpc") == config.grpc.port == ServiceConfig().grpc.port
    assert config.grpc.host == "0.0.0.0", "gRPC must listen on the pod's address, not loopback"
    for name in ("ftserve", "ftserve-replicas"):
        ports = {p["name"]: p["port"] for p in m.find("Service", name)["spec"]["ports"]}
        assert ports == {"http": m.port(main, "http"), "grpc": m.port(main, "grpc")}


def test_probe_paths_are_served(service: dict[str, Any]) -> None:
    deployment = m.find("Deployment", "ftserve")
    main = m.container(deployment, "ftserve")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] in service["routes"], probe
        assert main[probe]["httpGet"]["port"] == "http"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the one that waits for the engine
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == m.port(main, "http")
    assert annotations["prometheus.io/path"] in service["routes"]


def test_router_probe_paths_are_served() -> None:
    router = m.find("Deployment", "ftserve-router")
    main = m.container(router, "router")
    app = build_app(RouterConfig(dns_name="replicas.test"), None)
    paths = {route.path for route in app.routes if "{" not in route.path}  # not the proxy's catch-all
    asyncio.run(app.state.router.client.aclose())
    for probe in ("readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] in paths, probe
    annotations = router["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in paths
    assert int(annotations["prometheus.io/port"]) == m.port(main, "http")


def test_configmap_carries_the_default_deployment_file() -> None:
    configmap = m.find("ConfigMap", "ftserve-config")
    assert configmap["data"]["deployment.yaml"] == m.DEFAULT_DEPLOYMENT.read_text()


def test_the_pod_resolves_its_settings_from_the_mounted_file_and_its_environment(config: ServiceConfig) -> None:
    spec = m.find("Deployment", "ftserve")["spec"]["template"]["spec"]
    main = m.container(m.find("Deployment", "ftserve"), "ftserve")
    env = m.env_values(main)
    mounts = {v["name"]: v["mountPath"] for v in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_volume = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name") == "ftserve-config")
    assert env["FTSERVE_CONFIG"] == f"{mounts[config_volume]}/deployment.yaml"
    assert config.store.home == Path(env["FTSERVE_HOME"])
    assert config.engine.num_threads == math.ceil(m.cpu_cores(main["resources"]["limits"]["cpu"]))
    assert m.secret_env(main)[config.admin.token_env] == ("ftserve-admin", "token")
    assert spec["enableServiceLinks"] is False  # service links would add FTSERVE_* variables


def test_the_init_container_pulls_the_served_model_into_the_served_store(config: ServiceConfig) -> None:
    deployment = m.find("Deployment", "ftserve")
    init, main = m.container(deployment, "model-pull"), m.container(deployment, "ftserve")
    assert init["command"] == ["python", "-m", "ftserve.cli"]
    ns = build_parser().parse_args(init["args"])
    assert (ns.group, ns.action, ns.ref) == ("model", "pull", config.model)
    home = m.env_values(init)["FTSERVE_HOME"]
    assert home == m.env_values(main)["FTSERVE_HOME"]
    for c in (init, main):
        assert {v["mountPath"]: v["name"] for v in c["volumeMounts"]}[home] == "model-store"


@pytest.mark.parametrize("deployment", ["ftserve", "ftserve-router"])
def test_pods_run_unprivileged_and_write_only_to_their_volumes(deployment: str) -> None:
    doc = m.find("Deployment", deployment)
    spec = doc["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    for c in m.containers(doc, init=True):
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        writable = [v["mountPath"] for v in c["volumeMounts"] if not v.get("readOnly", False)]
        for name in ("FTSERVE_HOME", "BENTOML_HOME", "HF_HOME"):
            if name in m.env_values(c):
                path = Path(m.env_values(c)[name])
                assert any(path.is_relative_to(w) for w in writable), f"{c['name']}: {name} is read-only"


def test_termination_lets_the_longest_request_finish(config: ServiceConfig) -> None:
    spec = m.find("Deployment", "ftserve")["spec"]["template"]["spec"]
    pause = m.container(m.find("Deployment", "ftserve"), "ftserve")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert config.limits.request_timeout_s is not None
    assert spec["terminationGracePeriodSeconds"] >= pause + config.limits.request_timeout_s
    # The router must have dropped a terminating replica (re-resolved DNS) before it stops taking requests.
    assert _router_config().refresh_s + COREDNS_TTL_S < pause


def test_router_options_are_valid_router_settings_that_point_at_the_replicas(config: ServiceConfig) -> None:
    router_deployment = m.find("Deployment", "ftserve-router")
    router = m.container(router_deployment, "router")
    main = m.container(m.find("Deployment", "ftserve"), "ftserve")
    settings = _router_config()
    headless = m.find("Service", "ftserve-replicas")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert settings.dns_name == "ftserve-replicas.$(POD_NAMESPACE).svc.cluster.local"
    namespace_ref = next(v for v in router["env"] if v["name"] == "POD_NAMESPACE")["valueFrom"]["fieldRef"]
    assert namespace_ref["fieldPath"] == "metadata.namespace"
    assert settings.replica_port == m.port(main, "http")
    assert (settings.host, settings.port) == ("0.0.0.0", m.port(router, "http"))
    assert m.secret_env(router)[settings.admin_token_env] == m.secret_env(main)[config.admin.token_env]
    assert settings.max_body_bytes == config.limits.max_request_bytes
    assert router_deployment["spec"]["replicas"] >= 2
