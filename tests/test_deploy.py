"""The deployment files in deploy/ agree with the node they deploy.

No container engine, cluster or Envoy runs on the test machines, so the
compose file, the Kubernetes manifests and the Envoy bootstrap are checked
by reading them: each parses, has the kinds, versions and fields it needs,
and names only what the node really has. What can be checked against the
real thing is: the probe paths and health checks are GETs on a real node
that answer 200 on its default port; every FASTWS_* variable is an option
the node accepts; a node started with the shipped settings and holding
connections drains and exits within the grace periods the files give it;
and every metric the Grafana dashboard queries is served by a real node
with a real Redis, each of its queries run by a real Prometheus that
scraped it. Neither kubectl nor Envoy is run: neither is a package this
project's test machines can install, and a test that needs a missing
binary must fail, not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    HOST,
    REPO,
    NodeProcess,
    clean_env,
    free_port,
    http_get,
    proto_client,
    start_node,
    start_redis,
    unique,
    wait_exit,
)

import fastws.client
from fastws import config as fastws_config
from fastws.config import Config, ConfigError

pytestmark = pytest.mark.timeout(90)

DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
DEFAULTS = Config()
# What the node answers besides WebSocket upgrades (fastws/node.py): a
# probe or health check must name one of these.
PROBE_PATHS = ("/healthz", "/readyz")


def load_yaml(path: Path) -> Any:
    with path.open() as fh:
        return yaml.safe_load(fh)


def kube(name: str) -> dict[str, Any]:
    doc = load_yaml(KUBE / name)
    assert isinstance(doc, dict), name
    return doc


def compose() -> dict[str, Any]:
    doc = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """A compose value as compose makes it with none of its variables set."""
    return _INTERPOLATION.sub(lambda m: m[2] or "", value)


def seconds(duration: str | int | float) -> float:
    """A compose or Envoy duration (`30s`, `1m30s`, `0s`) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    h, m, s = (float(p) if p else 0.0 for p in parts.groups())
    return h * 3600 + m * 60 + s


def options_from(env: dict[str, str], where: str) -> Config:
    """The node's configuration from these variables, as it would resolve them."""
    for name in env:
        if name.startswith("FASTWS_"):
            assert name in {o.env for o in fastws_config.OPTIONS}, f"{where}: {name} is no option"
    return fastws_config.load(environ=env)


def deployment() -> dict[str, Any]:
    return kube("deployment.yaml")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    assert isinstance(only, dict)
    return only


def kube_config() -> Config:
    """The node's settings in the cluster: the ConfigMap, the example Secret, the env."""
    env = {k: str(v) for k, v in kube("configmap.yaml")["data"].items()}
    env.update({k: str(v) for k, v in kube("secret.example.yaml")["stringData"].items()})
    env.update({e["name"]: "pod-name" for e in container()["env"] if "valueFrom" in e})
    return options_from(env, "deploy/kubernetes")


def compose_environment() -> dict[str, str]:
    env = compose()["services"]["fastws"]["environment"]
    assert isinstance(env, dict)
    return {k: interpolate(str(v)) for k, v in env.items()}


def client_heartbeat_timeout() -> float:
    default = inspect.signature(fastws.client.Client).parameters["heartbeat_timeout"].default
    return float(default)


def dead_link_bound(config: Config) -> float:
    """The longest a live connection stays silent: what a proxy timeout must exceed."""
    return max(config.ping_interval + config.ping_timeout, client_heartbeat_timeout())


def drain_time(config: Config) -> float:
    """How long a node may take from SIGTERM to exit (fastws/node.py Node.stop)."""
    return config.drain_period + config.close_timeout + 1.0


# --------------------------------------------------------------------------
# the Dockerfile
# --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def image_uid() -> int:
    (useradd,) = [args for op, args in dockerfile() if op == "RUN" and "useradd" in args]
    match = re.search(r"--uid (\d+)", useradd)
    assert match, useradd
    return int(match[1])


def test_the_image_listens_exposes_and_probes_the_node_s_default_port() -> None:
    instructions = dockerfile()
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert f"FASTWS_PORT={DEFAULTS.port}" in env
    assert ("EXPOSE", str(DEFAULTS.port)) in instructions
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{DEFAULTS.port}/healthz" in healthcheck
    assert ("STOPSIGNAL", "SIGTERM") in instructions  # SIGTERM drains (docs/lifecycle.md)


def test_the_image_installs_the_redis_extra_that_the_deployments_use() -> None:
    installs = [args for op, args in dockerfile() if op == "RUN" and "pip install" in args]
    assert any("[redis]" in args for args in installs), installs
    assert "FASTWS_REDIS" in compose_environment()
    assert "FASTWS_REDIS" in kube("secret.example.yaml")["stringData"]


# --------------------------------------------------------------------------
# every probe and health check is an endpoint a real node answers
# --------------------------------------------------------------------------


def kube_probes() -> dict[str, dict[str, Any]]:
    c = container()
    return {kind: c[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def envoy() -> dict[str, Any]:
    doc = load_yaml(DEPLOY / "envoy.yaml")
    assert isinstance(doc, dict)
    return doc


def envoy_cluster() -> dict[str, Any]:
    (cluster,) = envoy()["static_resources"]["clusters"]
    assert isinstance(cluster, dict)
    return cluster


def probed_paths() -> set[str]:
    paths = {probe["httpGet"]["path"] for probe in kube_probes().values()}
    paths |= {hc["http_health_check"]["path"] for hc in envoy_cluster()["health_checks"]}
    (healthcheck,) = [args for op, args in dockerfile() if op == "HEALTHCHECK"]
    paths |= set(re.findall(r"http://[^/]+(/[a-z]+)", healthcheck))
    return paths


@pytest.fixture(scope="module")
def default_node() -> Iterator[NodeProcess]:
    """A node on its default port, if that port is free here, else on a free one."""
    port = DEFAULTS.port
    try:
        with socket.create_server((HOST, port)):
            pass
    except OSError:
        port = free_port()
    node = start_node(port)
    yield node
    node.stop()
    node.cleanup_files()


def test_every_probe_and_health_check_gets_200_from_a_real_node(
    default_node: NodeProcess,
) -> None:
    paths = probed_paths()
    assert paths == {"/healthz", "/readyz"}, paths
    for path in sorted(paths):
        assert path in PROBE_PATHS
        answer = http_get(default_node.port, path)
        assert answer.status == 200, (path, answer)
    # and a path the node does not have is not 200: the check means something
    assert http_get(default_node.port, "/ready").status == 404


def test_liveness_is_healthz_and_readiness_is_readyz_on_the_container_port() -> None:
    probes = kube_probes()
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    # /readyz is the one that turns 503 when the node drains or loses Redis
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (port,) = container()["ports"]
    assert port["containerPort"] == DEFAULTS.port and port["protocol"] == "TCP"
    for probe in probes.values():
        assert probe["httpGet"]["port"] in (port["name"], port["containerPort"])


# --------------------------------------------------------------------------
# options: every FASTWS_* variable is one the node accepts
# --------------------------------------------------------------------------


def test_the_kubernetes_settings_are_options_the_node_accepts() -> None:
    config = kube_config()
    assert config.port == DEFAULTS.port and config.workers == 1
    assert config.redis and config.trusted_proxies and config.log_format == "json"
    refs = container()["envFrom"]
    assert {"configMapRef": {"name": kube("configmap.yaml")["metadata"]["name"]}} in refs
    assert {"secretRef": {"name": kube("secret.example.yaml")["metadata"]["name"]}} in refs


def test_the_compose_settings_are_options_the_node_accepts() -> None:
    config = options_from(compose_environment(), "deploy/compose.yaml")
    assert config.redis == "redis://redis:6379/0" and "redis" in compose()["services"]
    assert config.log_format == "json"
    # the nodes trust exactly the network nginx reaches them on
    (subnet,) = compose()["networks"]["backend"]["ipam"]["config"]
    assert config.trusted_proxies == [interpolate(subnet["subnet"])]


def test_pods_get_no_service_link_variables_which_would_set_the_port() -> None:
    # Kubernetes names them after the Service, `fastws`: FASTWS_PORT and so on.
    service = kube("service.yaml")["metadata"]["name"]
    assert f"{service.upper()}_PORT" == "FASTWS_PORT"
    with pytest.raises(ConfigError, match="FASTWS_PORT"):
        fastws_config.load(environ={"FASTWS_PORT": "tcp://10.96.0.12:8080"})
    assert pod_spec()["enableServiceLinks"] is False


# --------------------------------------------------------------------------
# draining: the grace periods outlast the drain, and a real node proves it
# --------------------------------------------------------------------------


def pre_stop_seconds() -> float:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_the_kubernetes_grace_period_outlasts_the_pause_and_the_drain() -> None:
    config = kube_config()
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > config.drain_period + config.close_timeout
    assert grace > pre_stop_seconds() + drain_time(config)


def test_compose_s_stop_grace_period_outlasts_the_drain() -> None:
    config = options_from(compose_environment(), "deploy/compose.yaml")
    service = compose()["services"]["fastws"]
    grace = seconds(service["stop_grace_period"])
    assert grace > config.drain_period + config.close_timeout
    assert grace > drain_time(config)
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


async def test_a_node_with_the_shipped_settings_drains_within_the_grace_periods() -> None:
    """SIGTERM with clients connected: every one closed with 1001, exit 0, in time."""
    config = kube_config()
    env = {k: str(v) for k, v in kube("configmap.yaml")["data"].items()}
    node = start_node(env=env)
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(proto_client(node.ws_url())) for _ in range(8)
            ]
            started = time.monotonic()
            node.send_signal(signal.SIGTERM)
            code = await wait_exit(node, drain_time(config) + 5)
            elapsed = time.monotonic() - started
            assert code == 0, node.output_tail()
            for client in clients:
                await asyncio.wait_for(client.ws.wait_closed(), 5)
                assert client.ws.close_code == 1001
        # the drain really spread the closes (not an instant exit)...
        assert elapsed > config.drain_period / 2
        # ...and ended inside both orchestrators' grace
        assert elapsed < pod_spec()["terminationGracePeriodSeconds"] - pre_stop_seconds()
        assert elapsed < seconds(compose()["services"]["fastws"]["stop_grace_period"])
    finally:
        node.stop()
        node.cleanup_files()


# --------------------------------------------------------------------------
# Kubernetes: kinds, versions, and each object pointing at the right one
# --------------------------------------------------------------------------

KINDS = {
    "configmap.yaml": ("v1", "ConfigMap"),
    "secret.example.yaml": ("v1", "Secret"),
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "ingress.yaml": ("networking.k8s.io/v1", "Ingress"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
    "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "podmonitor.yaml": ("monitoring.coreos.com/v1", "PodMonitor"),
}


def test_every_manifest_has_its_kind_version_and_name() -> None:
    shipped = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert shipped == set(KINDS)
    for name, (api_version, kind) in KINDS.items():
        doc = kube(name)
        assert (doc["apiVersion"], doc["kind"]) == (api_version, kind), name
        assert doc["metadata"]["name"] == "fastws", name
        assert "namespace" not in doc["metadata"], f"{name}: leave the namespace to the user"


def test_the_kustomization_lists_every_manifest_but_the_secret_and_the_optional_crd() -> None:
    kustomization = kube("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == set(KINDS) - {
        "secret.example.yaml",  # to be filled in, never applied as it is
        "podmonitor.yaml",  # needs the Prometheus Operator's CRDs
    }
    (image,) = kustomization["images"]
    assert image["name"] == container()["image"]


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = deployment()["spec"]["template"]["metadata"]["labels"]
    return labels


def selects_pods(selector: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= pod_labels().items()


def test_the_deployment_service_pdb_and_hpa_select_the_same_pods() -> None:
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()
    assert selects_pods(kube("service.yaml")["spec"]["selector"])
    assert selects_pods(kube("pdb.yaml")["spec"]["selector"]["matchLabels"])
    assert selects_pods(kube("podmonitor.yaml")["spec"]["selector"]["matchLabels"])
    target = kube("hpa.yaml")["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fastws"}
    # the HPA owns the replica count; a count in the Deployment would fight it
    assert "replicas" not in deployment()["spec"]


def test_the_hpa_scales_on_cpu_and_the_pdb_always_leaves_pods_serving() -> None:
    hpa = kube("hpa.yaml")["spec"]
    (cpu,) = [m for m in hpa["metrics"] if m["type"] == "Resource"]
    assert cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"]["type"] == "Utilization"
    assert 0 < cpu["resource"]["target"]["averageUtilization"] < 100
    # utilization is a share of the request, so there must be one
    assert container()["resources"]["requests"]["cpu"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert kube("pdb.yaml")["spec"]["maxUnavailable"] < hpa["minReplicas"]
    # scaling down drains pods: slower than scaling up
    behavior = hpa["behavior"]
    assert (
        behavior["scaleDown"]["stabilizationWindowSeconds"]
        > behavior["scaleUp"]["stabilizationWindowSeconds"]
    )


def test_the_service_targets_the_container_port_and_the_ingress_the_service() -> None:
    (container_port,) = container()["ports"]
    service = kube("service.yaml")
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
    assert service["spec"].get("sessionAffinity", "None") == "None"  # no sticky sessions
    ingress = kube("ingress.yaml")
    paths = {}
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            backend = entry["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"] in ({"name": port["name"]}, {"number": port["port"]})
            paths[entry["path"]] = entry["pathType"]
    # the WebSocket endpoint and the browser client, nothing per-node
    assert paths == {DEFAULTS.path: "Exact", "/fastws.js": "Exact"}


def test_the_ingress_timeouts_outlast_both_ends_heartbeats() -> None:
    annotations = kube("ingress.yaml")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    bound = dead_link_bound(kube_config())
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[prefix + name]) > bound, name
    assert "http_503" in annotations[prefix + "proxy-next-upstream"].split()
    assert float(annotations[prefix + "proxy-connect-timeout"]) <= 5


def test_the_pods_run_as_the_image_s_non_root_user_on_a_read_only_filesystem() -> None:
    pod, box = pod_spec()["securityContext"], container()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == image_uid() != 0
    assert box["readOnlyRootFilesystem"] is True
    assert box["allowPrivilegeEscalation"] is False
    assert box["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container()["volumeMounts"]} == {"/tmp"}
    assert "memory" in container()["resources"]["limits"]


def test_compose_runs_redis_with_its_append_only_file_on_a_volume() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_compose_builds_the_nodes_from_the_dockerfile_and_keeps_them_private() -> None:
    services = compose()["services"]
    fastws = services["fastws"]
    context = (DEPLOY / fastws["build"]["context"]).resolve()
    assert context == REPO and (context / fastws["build"]["dockerfile"]).is_file()
    assert fastws["deploy"]["replicas"] >= 2
    assert "ports" not in fastws and "ports" not in services["redis"]
    # the image's HEALTHCHECK applies (not turned off), and nginx waits for it
    assert "healthcheck" not in fastws
    assert services["nginx"]["depends_on"]["fastws"]["condition"] == "service_healthy"
    assert fastws["depends_on"]["redis"]["condition"] == "service_healthy"
    assert fastws["ulimits"]["nofile"]["soft"] >= 65536


def test_compose_s_relative_paths_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"


# nginx: the compose variant differs from the tested file only where it says so


def directives(conf: str) -> list[str]:
    """An nginx config as its directives and block openings, comments dropped."""
    text = re.sub(r"#[^\n]*", "", conf)
    return [" ".join(part.split()) for part in re.split(r"[;{}]", text) if part.strip()]


def test_the_compose_nginx_config_is_the_tested_one_but_for_its_upstream_and_log() -> None:
    shipped = directives((DEPLOY / "nginx.conf").read_text())
    variant_text = (DEPLOY / "compose" / "nginx.conf").read_text()
    variant = directives(variant_text)

    def common(found: list[str]) -> list[str]:
        return [
            d
            for d in found
            if not d.startswith(("server 10.", "server fastws:", "resolver ", "access_log "))
        ]

    assert common(variant) == common(shipped)
    assert variant.count("server fastws:8080 resolve max_fails=1 fail_timeout=10s") == 1
    assert "resolver 127.0.0.11 valid=5s ipv6=off" in variant
    # the upstream's name and port are the compose service and the node's port
    assert "fastws" in compose()["services"] and DEFAULTS.port == 8080
    assert "COMPOSE" in variant_text
    image = compose()["services"]["nginx"]["image"]
    match = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?-alpine", image)
    assert match, image
    # `resolve` in an upstream is in open-source nginx from 1.27.3 on
    assert tuple(int(p or 0) for p in match.groups()) >= (1, 27, 3)


def test_compose_s_prometheus_config_is_valid_and_finds_the_nodes() -> None:
    path = DEPLOY / "compose" / "prometheus.yml"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run `bash scripts/system-deps.sh test`")
    subprocess.run([promtool, "check", "config", str(path)], check=True, capture_output=True)
    (job,) = load_yaml(path)["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["fastws"] and sd["port"] == DEFAULTS.port


def test_compose_s_grafana_loads_the_dashboard_from_where_it_is_mounted() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = load_yaml(DEPLOY / "compose" / "grafana" / "dashboards" / "fastws.yaml")
    (entry,) = provider["providers"]
    assert mounts["./grafana"] == entry["options"]["path"]
    assert (DEPLOY / "grafana" / "fastws-dashboard.json").is_file()


# --------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------


def envoy_hcm() -> dict[str, Any]:
    (listener,) = envoy()["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    config: dict[str, Any] = hcm["typed_config"]
    assert config["@type"].endswith(".http_connection_manager.v3.HttpConnectionManager")
    return config


def test_envoy_upgrades_websockets_on_the_node_s_path_with_no_route_timeout() -> None:
    hcm = envoy_hcm()
    assert {"upgrade_type": "websocket"} in hcm["upgrade_configs"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    routes = {r["match"].get("path", r["match"].get("prefix")): r for r in vhost["routes"]}
    ws = routes[DEFAULTS.path]["route"]
    assert ws["cluster"] == envoy_cluster()["name"]
    assert seconds(ws["timeout"]) == 0  # a WebSocket outlives any request timeout
    assert seconds(ws["idle_timeout"]) > dead_link_bound(DEFAULTS)
    assert "retriable-status-codes" in ws["retry_policy"]["retry_on"]
    assert 503 in ws["retry_policy"]["retriable_status_codes"]
    assert routes["/fastws.js"]["route"]["cluster"] == envoy_cluster()["name"]
    # everything else, the per-node endpoints included, is 404
    assert routes["/"]["direct_response"]["status"] == 404
    assert set(routes) == {DEFAULTS.path, "/fastws.js", "/"}


def test_envoy_appends_the_client_address_to_x_forwarded_for() -> None:
    hcm = envoy_hcm()
    assert hcm["use_remote_address"] is True
    assert hcm["xff_num_trusted_hops"] == 0


def test_envoy_s_cluster_reaches_the_nodes_port_and_health_checks_readyz() -> None:
    cluster = envoy_cluster()
    (group,) = cluster["load_assignment"]["endpoints"]
    for endpoint in group["lb_endpoints"]:
        assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == DEFAULTS.port
    (check,) = cluster["health_checks"]
    assert check["http_health_check"]["path"] == "/readyz"
    # the default circuit breakers would stop at 1,024 open WebSockets
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_connections"] > 1024 and thresholds["max_requests"] > 1024
    options = cluster["typed_extension_protocol_options"]
    (http,) = options.values()
    assert "http_protocol_options" in http["explicit_http_config"]  # HTTP/1.1 to the nodes


# --------------------------------------------------------------------------
# the Grafana dashboard: every metric served, every query run by Prometheus
# --------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "fastws-dashboard.json"
_METRIC = re.compile(r"\bfastws_[a-z0-9_]+")
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_]+)\s*\}\}")
# Labels Prometheus adds to every target's series.
TARGET_LABELS = {"instance", "job"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """Every panel's (expr, legend)."""
    return [(t["expr"], t.get("legendFormat", "")) for p in panels() for t in p["targets"]]


def variable_queries() -> list[str]:
    return [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and panel["title"] and panel["description"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"]
    # laid out on Grafana's 24-column grid
    for panel in board["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def served_metrics(exposition: str) -> tuple[set[str], dict[str, set[str]]]:
    """The series names a scrape offers, and the label names seen on each.

    A family is served from its TYPE line even before it has a sample (a
    labelled counter nothing has counted yet): a counter as NAME_total, a
    histogram as its _bucket, _sum and _count.
    """
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            # prometheus_client writes a counter's TYPE line with or without
            # _total, depending on its version
            family = family.removesuffix("_total") if kind == "counter" else family
            names |= {family + s for s in suffixes.get(kind, ("",))}
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split()[0]
            names.add(name)
            labels.setdefault(name, set()).update(re.findall(r"([a-zA-Z_]+)=\"", rest))
    return names, labels


@pytest.fixture
def redis_of_its_own() -> Iterator[NodeProcess]:
    """A redis-server this test alone uses, so that it may kill it."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
        server.cleanup_files()


@pytest.fixture
def redis_node(redis_of_its_own: NodeProcess) -> Iterator[NodeProcess]:
    """A node on a real Redis, which is what the broker panels describe."""
    url = f"redis://{HOST}:{redis_of_its_own.port}/0"
    node = start_node(args=["--redis", url, "--node-name", "deploy-dashboard"])
    yield node
    node.stop()
    node.cleanup_files()


async def make_traffic(node: NodeProcess) -> None:
    """Subscriptions, publications, a resumed subscription and a close."""
    channel = unique("dash")
    async with proto_client(node.ws_url()) as sub, proto_client(node.ws_url()) as pub:
        first = await sub.sub(channel)
        for i in range(3):
            await pub.pub(channel, {"n": i})
        for _ in range(3):
            await sub.next_pub(channel)
    async with proto_client(node.ws_url()) as again:
        since = {"epoch": first["epoch"], "seq": first["seq"]}
        answer = await again.sub(channel, since=since)
        assert answer["recovered"] is True
        await again.request({"op": "history", "ch": channel})


def start_prometheus(target: int, job: str, workdir: Path) -> tuple[NodeProcess, int]:
    """A real Prometheus scraping ``target`` every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed; run `bash scripts/system-deps.sh test`")
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n"
        f"      - targets: ['{HOST}:{target}']\n"
    )
    port = free_port()
    argv = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={HOST}:{port}",
        "--log.level=warn",
    ]
    server = NodeProcess(argv, port, clean_env(), "prometheus")
    try:
        server.wait_ready(lambda: http_get(port, "/-/ready", timeout=1).status == 200, 30)
    except BaseException:
        server.stop()
        server.cleanup_files()
        raise
    return server, port


def prometheus_query(port: int, promql: str) -> dict[str, Any]:
    path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = http_get(port, path)
    body: dict[str, Any] = json.loads(answer.body)
    return body


async def wait_for_series(port: int, promql: str, at_least: float = 0.0) -> None:
    """Until ``promql`` returns a series whose first value is at least ``at_least``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = (await asyncio.to_thread(prometheus_query, port, promql))["data"]["result"]
        if result and float(result[0]["value"][1]) >= at_least:
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"prometheus never answered {promql} with a value >= {at_least}")


def as_promql(expr: str, job: str) -> str:
    """A panel's query as Grafana sends it, with the dashboard's variables set."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('"$job"', f'"{job}"')
        .replace('"$instance"', '".+"')
    )


async def test_every_metric_the_dashboard_queries_is_served_by_a_real_node(
    redis_node: NodeProcess, redis_of_its_own: NodeProcess, tmp_path: Path
) -> None:
    """A node on Redis serves clients, then loses Redis; Prometheus runs every panel.

    Losing Redis is what gives the broker-error counter its first series, so
    that every panel, that one included, has data to show.
    """
    job = "fastws"
    await make_traffic(redis_node)
    prometheus, port = start_prometheus(redis_node.port, job, tmp_path)
    try:
        # rate() needs two samples in its window: wait for a few scrapes
        await wait_for_series(port, f'count_over_time(fastws_processes{{job="{job}"}}[1m])', 3)
        await make_traffic(redis_node)
        redis_of_its_own.proc.kill()
        redis_of_its_own.proc.wait(5)
        deadline = time.monotonic() + 15
        while True:
            scrape = await asyncio.to_thread(http_get, redis_node.port, "/metrics")
            if "fastws_broker_errors_total{" in scrape.text:
                break
            assert time.monotonic() < deadline, "the node never counted the lost Redis"
            await asyncio.sleep(0.2)
        served, labels = served_metrics(scrape.text)

        used: set[str] = set()
        for expr, legend in queries():
            named = set(_METRIC.findall(expr))
            assert named, expr
            used |= named
            missing = named - served
            assert not missing, f"not served by the node: {sorted(missing)} in {expr}"
            # a legend names labels the series have (or that Prometheus adds)
            have = TARGET_LABELS.union(*(labels.get(n, set()) for n in named))
            for label in _LEGEND_LABEL.findall(legend):
                assert label in have, f"{label!r} in legend {legend!r}: not a label of {named}"
            for by in re.findall(r"by \(([^)]*)\)", expr):
                for label in (part.strip() for part in by.split(",")):
                    assert label in have | {"le"}, f"by ({label}) in {expr}"
        for query in variable_queries():
            assert set(_METRIC.findall(query)) <= served, query
        # the dashboard covers the node's main families, not a token few
        for family in (
            "fastws_connections_open",
            "fastws_connections_refused_total",
            "fastws_connections_closed_total",
            "fastws_messages_in_total",
            "fastws_bytes_out_total",
            "fastws_publications_total",
            "fastws_deliveries_total",
            "fastws_ping_rtt_seconds_bucket",
            "fastws_broker_latency_seconds_bucket",
            "fastws_broker_errors_total",
            "fastws_recoveries_total",
            "fastws_history_publications",
        ):
            assert family in used, family

        # a series born now has a rate() once it has two samples
        await wait_for_series(
            port, f'count_over_time(fastws_broker_errors_total{{job="{job}"}}[1m])', 2
        )
        for expr, _ in queries():
            promql = as_promql(expr, job)
            answer = await asyncio.to_thread(prometheus_query, port, promql)
            assert answer["status"] == "success", (promql, answer)
            assert answer["data"]["result"], f"no series for {promql}"
        for query in variable_queries():
            # Grafana's label_values(selector, label): the label's values there
            parsed = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
            assert parsed, query
            selector, label = parsed.groups()
            promql = f"group by ({label}) ({as_promql(selector, job)})"
            answer = await asyncio.to_thread(prometheus_query, port, promql)
            assert answer["data"]["result"], (query, answer)
    finally:
        prometheus.stop()
        prometheus.cleanup_files()
