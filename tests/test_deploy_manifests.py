"""The deployment kit, validated offline: Kubernetes (Kustomize base and GPU overlay), the Prometheus
adapter rules, KServe's ServingRuntime and InferenceService, the compose file and its balancer,
the Prometheus alert rules and the Grafana dashboard.

- Kubernetes resources are rendered from their kustomizations (only ``resources`` and strategic
  merge ``patches`` are used, which :func:`render` implements: maps merge, lists of named items
  merge by ``name``, other lists are replaced) and validated with kubernetes-validate's bundled
  OpenAPI schemas of Kubernetes ``K8S_VERSION``, strictly (unknown fields are errors).
- KServe resources are checked field by field against the KServe Python SDK's models (their
  ``openapi_types`` and ``attribute_map``; core types from the Kubernetes client's models), and
  built with the SDK's client-side validation (required fields, enums).
- docker-compose.yml is parsed by compose-spec (bindings of the compose_spec crate, which types
  the Compose Specification), after YAML anchors and merge keys are resolved as Compose does.
- alerts.yml goes through ``promtool check rules``; every metric the rules, the dashboard and the
  adapter read is one a real server exposes on ``/metrics``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "gpu"]


# -- a Kustomize subset --------------------------------------------------------------------------------
def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge patch, as Kubernetes does it for the fields used here: maps merge key by
    key, lists whose items all carry a ``name`` (containers, env, volumes, mounts) merge by name,
    any other list or value is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = [copy.deepcopy(i) for i in base]
        index = {item["name"]: n for n, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources of a kustomization directory, with its patches applied."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{directory}: kustomization fields the test's renderer does not implement: {unknown}"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += render(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch["target"]
        hits = [n for n, r in enumerate(resources)
                if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} resources"
        resources[hits[0]] = _merge(resources[hits[0]], body)
    return resources


def _by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} resources"
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# -- Kubernetes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_rendered_resource_validates_against_kubernetes_schemas(directory: Path) -> None:
    import kubernetes_validate

    resources = render(directory)
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    for resource in resources:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_the_validator_refuses_a_broken_deployment() -> None:
    """The check above can fail: a user name where Kubernetes wants a number, and a misspelt field."""
    import kubernetes_validate

    deployment = _by_kind(render(K8S / "base"), "Deployment")
    named = copy.deepcopy(deployment)
    named["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = "flowserve"
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    for broken in (named, misspelt):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_probes_drain_threads_user_and_models() -> None:
    resources = render(K8S / "base")
    deployment = _by_kind(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the whole drain fits in the grace period: preStop, readiness-off delay, requests in flight + uvicorn's margin
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + float(env["FLOWSERVE_DRAIN_DELAY_S"]) + float(env["FLOWSERVE_REQUEST_TIMEOUT_S"]) + 10
    assert pod["terminationGracePeriodSeconds"] >= drain
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # torch threads from the CPU limit
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env[name]["resourceFieldRef"] == {"containerName": container["name"], "resource": "limits.cpu",
                                                 "divisor": "1"}
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"]
    # numeric non-root user, the Dockerfile's own
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = pod["securityContext"]["runAsUser"]
    assert isinstance(uid, int) and uid > 0
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert users and users[-1].split(":")[0] == str(uid)
    # the model repository: a read-only volume at FLOWSERVE_MODEL_DIR
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["FLOWSERVE_MODEL_DIR"])
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert volume["persistentVolumeClaim"]["claimName"] == _by_kind(resources, "PersistentVolumeClaim")["metadata"]["name"]
    # Service and PodDisruptionBudget select these pods; the HPA scales this Deployment
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (_by_kind(resources, "Service")["spec"]["selector"],
                     _by_kind(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert _by_kind(resources, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_gpu_overlay_asks_for_one_gpu_and_keeps_the_base() -> None:
    base = _by_kind(render(K8S / "base"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    (gpu,) = _by_kind(render(K8S / "overlays" / "gpu"), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert _env(gpu)["FLOWSERVE_DEVICE"] == "cuda"
    assert set(_env(base)) == set(_env(gpu))  # env merged by name, nothing lost
    assert gpu["readinessProbe"] == base["readinessProbe"] and gpu["lifecycle"] == base["lifecycle"]
    assert gpu["image"] != base["image"]


def _adapter_rules() -> list[dict[str, Any]]:
    configmap = yaml.safe_load((K8S / "prometheus-adapter" / "configmap.yaml").read_text())
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def test_adapter_configmap_validates_and_serves_every_hpa_metric() -> None:
    import kubernetes_validate

    kubernetes_validate.validate(yaml.safe_load((K8S / "prometheus-adapter" / "configmap.yaml").read_text()),
                                 K8S_VERSION, strict=True)
    served = set()
    for rule in _adapter_rules():
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
        assert re.fullmatch(rule["name"]["matches"], series)
        served.add(rule["name"]["as"])
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    hpa = _by_kind(render(K8S / "base"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= served


# -- KServe ----------------------------------------------------------------------------------------------
_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
                                            "object": (object,), "datetime": (str,), "date": (str,)}


def _model_class(name: str) -> Any:
    import kserve.models
    import kubernetes.client.models

    cls = getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)
    assert cls is not None, f"no SDK model named {name}"
    return cls


def check_sdk(value: Any, kind: str, where: str = "") -> None:
    """``value`` (parsed YAML) against an SDK model type ``kind``: every key known (by its JSON
    name), every value of its declared type, recursively; required fields and enums through the
    model's own constructor with client-side validation on."""
    if kind.startswith(("list[", "List[")):
        assert isinstance(value, list), f"{where}: expected a list"
        for n, item in enumerate(value):
            check_sdk(item, kind[5:-1], f"{where}[{n}]")
        return
    if kind.startswith(("dict(", "Dict[")):
        assert isinstance(value, dict), f"{where}: expected a map"
        inner = kind[5:-1].split(",", 1)[1].strip()
        for key, item in value.items():
            check_sdk(item, inner, f"{where}.{key}")
        return
    if kind in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
        assert ok, f"{where}: {value!r} is not {kind}"
        return
    cls = _model_class(kind)
    assert isinstance(value, dict), f"{where}: expected a {kind} object"
    if hasattr(cls, "model_fields"):  # the Kubernetes client's core types are pydantic models
        _check_pydantic(value, cls, where)
        cls.model_validate(value)  # types, required fields
        return
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = set(value) - set(by_json)
    assert not unknown, f"{where}: fields not in {kind}: {sorted(unknown)}"
    for json_name, item in value.items():
        check_sdk(item, cls.openapi_types[by_json[json_name]], f"{where}.{json_name}")
    configuration = type(cls().local_vars_configuration)() if _builds_empty(cls) else None
    kwargs = {by_json[k]: v for k, v in value.items()}
    if configuration is not None:
        configuration.client_side_validation = True
        kwargs["local_vars_configuration"] = configuration
    cls(**kwargs)  # raises ValueError on a missing required field or a value outside an enum


def _check_pydantic(value: Any, annotation: Any, where: str) -> None:
    """Unknown keys anywhere below a pydantic model (by alias) are errors (pydantic ignores them)."""
    import typing

    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) or str(origin) == "typing.Annotated":
        for arg in args:
            if arg is not type(None):
                _check_pydantic(value, arg, where)
                return
    if origin is list and isinstance(value, list):
        for n, item in enumerate(value):
            _check_pydantic(item, args[0], f"{where}[{n}]")
    elif origin is dict and isinstance(value, dict):
        for key, item in value.items():
            _check_pydantic(item, args[1], f"{where}.{key}")
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        by_alias = {(f.serialization_alias or f.alias or name): f for name, f in annotation.model_fields.items()}
        unknown = set(value) - set(by_alias)
        assert not unknown, f"{where}: fields not in {annotation.__name__}: {sorted(unknown)}"
        for key, item in value.items():
            _check_pydantic(item, by_alias[key].annotation, f"{where}.{key}")


def _builds_empty(cls: Any) -> bool:
    try:
        cls()
        return True
    except (TypeError, ValueError):
        return False


def test_kserve_resources_match_the_sdk_models() -> None:
    pytest.importorskip("kserve", reason="the KServe SDK (dev extra) is not installed")
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    check_sdk(runtime, "V1alpha1ServingRuntime", "ServingRuntime")
    check_sdk(service, "V1beta1InferenceService", "InferenceService")
    # the runtime serves what the service asks for, on the Open Inference Protocol
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["v2"]
    (container,) = runtime["spec"]["containers"]
    env = _env(container)
    assert env["FLOWSERVE_MODEL_DIR"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert container["ports"][0]["containerPort"] == int(env["FLOWSERVE_PORT"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["runAsUser"] == 10001


def test_kserve_check_refuses_unknown_and_mistyped_fields() -> None:
    pytest.importorskip("kserve", reason="the KServe SDK (dev extra) is not installed")
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    misspelt = copy.deepcopy(service)
    misspelt["spec"]["predictor"]["model"]["storageURI"] = misspelt["spec"]["predictor"]["model"].pop("storageUri")
    mistyped = copy.deepcopy(service)
    mistyped["spec"]["predictor"]["minReplicas"] = "two"
    for broken in (misspelt, mistyped):
        with pytest.raises(AssertionError):
            check_sdk(broken, "V1beta1InferenceService", "InferenceService")


# -- Compose and its balancer ------------------------------------------------------------------------------
def _compose(text: str) -> Any:
    from compose_spec import PyCompose

    return PyCompose.from_json(json.dumps(yaml.safe_load(text)))  # anchors and merge keys resolved first


def test_compose_file_follows_the_compose_specification() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert sorted(_compose(text).service_names()) == ["balancer", "flowserve", "flowserve-gpu"]
    data = yaml.safe_load(text)
    assert data["services"]["flowserve"]["deploy"]["replicas"] >= 2
    assert "ports" not in data["services"]["flowserve"]  # only the balancer is published
    config_mount = data["services"]["balancer"]["volumes"][0].split(":")
    assert (ROOT / config_mount[0]).is_file() and config_mount[-1] == "ro"
    with pytest.raises(ValueError):
        _compose(text.replace("restart: unless-stopped", "restart: sometimes"))


HAPROXY = pytest.mark.skipif(shutil.which("haproxy") is None,
                             reason="haproxy is not installed (Debian package haproxy; make test installs it as root)")


@HAPROXY
def test_balancer_configurations_pass_haproxy_check(tmp_path: Path) -> None:
    from deploy.local.cluster import haproxy_config

    local = tmp_path / "local.cfg"
    local.write_text(haproxy_config(18080, [("r1", 18081), ("r2", 18082)]))
    for path in (DEPLOY / "haproxy" / "haproxy-compose.cfg", local):
        check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr + check.stdout
        assert "GET /readyz" in path.read_text()
    broken = tmp_path / "broken.cfg"
    broken.write_text(local.read_text().replace("balance leastconn", "balance fastest"))
    assert subprocess.run(["haproxy", "-c", "-f", str(broken)], capture_output=True).returncode != 0


# -- Prometheus rules and the dashboard ----------------------------------------------------------------
PROMTOOL = pytest.mark.skipif(shutil.which("promtool") is None,
                              reason="promtool is not installed (Debian package prometheus; make test installs it as root)")


@PROMTOOL
def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    rules = DEPLOY / "prometheus" / "alerts.yml"
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    broken = tmp_path / "broken.yml"
    broken.write_text(rules.read_text().replace("rate(flowserve_requests_total[5m])", "rate(flowserve_requests_total[5m)", 1))
    assert subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True).returncode != 0


_METRIC = re.compile(r"\b((?:flowserve|process|python)_[a-zA-Z0-9_]+)")


def _queries() -> dict[str, set[str]]:
    """Every metric name that the alert rules, the dashboard and the adapter rules read."""
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "flowserve-dashboard.json").read_text())
    return {
        "alerts": {m for g in alerts["groups"] for r in g["rules"] for m in _METRIC.findall(r["expr"])},
        "dashboard": {m for p in dashboard["panels"] for t in p["targets"] for m in _METRIC.findall(t["expr"])},
        "adapter": {m for r in _adapter_rules() for m in _METRIC.findall(r["seriesQuery"])},
    }


def test_rules_dashboard_and_adapter_read_only_metrics_a_server_exposes(server: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        assert http.post("/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.25]]}).status_code == 200
        exposed = {line.split("{")[0].split(" ")[0] for line in http.get("/metrics").text.splitlines()
                   if line and not line.startswith("#")}
    queries = _queries()
    assert all(queries.values()), queries
    for where, names in queries.items():
        assert names <= exposed, f"{where} reads metrics no server exposes: {sorted(names - exposed)}"
    dashboard = json.loads((DEPLOY / "grafana" / "flowserve-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]


def test_metrics_carry_process_collectors_and_per_model_queue_depth(server: Any) -> None:
    from tests.server import metric_value

    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        assert http.post("/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.25]] * 3}).status_code == 200
        text = http.get("/metrics").text
    assert metric_value(text, "process_resident_memory_bytes") > 10e6
    assert metric_value(text, "process_cpu_seconds_total") > 0
    assert metric_value(text, "python_info") == 1
    assert "python_gc_collections_total" in text
    # the per-model gauge has a child for the queue the request went through, empty again now
    series = re.findall(r'^flowserve_model_queue_rows\{([^}]*)\} (\S+)$', text, re.M)
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', s)) for s, _ in series]
    assert {"model": "moons", "version": "2", "pass": "encode"} in labels, series
    assert all(float(v) == 0.0 for _, v in series)
