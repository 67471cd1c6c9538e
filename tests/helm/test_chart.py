"""helm/quantserve renders with Helm's own engine for its defaults and every example, and every object is valid.

Kubernetes objects are checked against kubernetes-validate's strict schemas for the oldest and newest Kubernetes the
chart supports; the RayService and PodMonitors against the vendored CRD schemas in tests/helm/schemas/.
"""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from .chart import (CHART, CRD_FILES, K8S_VERSIONS, NAMESPACE, RELEASE, container, crd, k8s_type_validator, manifests,
                    merged, one, pod_templates, ports, render, schema_errors, values_cases)

CASES = values_cases()
IDS = [case_id for case_id, _ in CASES]


def test_helm_engine_is_the_real_one():
    # Helm's Go SDK inside helm-python-sdk: the version of the Helm library that renders, no `helm` binary involved
    assert helm.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("case_id,values", CASES, ids=IDS)
def test_chart_lints_clean_in_strict_mode(case_id: str, values: dict[str, Any] | None):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    assert not problems, problems


@pytest.mark.parametrize("case_id,values", CASES, ids=IDS)
def test_renders_the_expected_objects(case_id: str, values: dict[str, Any] | None):
    docs = manifests(values)
    metrics = (values or {}).get("metrics", {})
    monitors = metrics.get("podMonitor", {}).get("enabled", True)
    dashboard = metrics.get("dashboard", {}).get("enabled", True)
    expected = [("ray.io/v1", "RayService")] + [("monitoring.coreos.com/v1", "PodMonitor")] * (2 * monitors) \
        + [("v1", "ConfigMap")] * dashboard
    assert sorted((d["apiVersion"], d["kind"]) for d in docs) == sorted(expected)
    names = [d["metadata"]["name"] for d in docs]
    assert len(names) == len(set(names))
    notes = render(values)["quantserve/templates/NOTES.txt"]
    name = one(docs, "RayService")["metadata"]["name"]
    assert f"svc/{name}-serve-svc" in notes and "user_config" in notes
    assert ("PodMonitors" in notes) is bool(monitors) and ("grafana_dashboard" in notes) is bool(dashboard)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case_id,values", CASES, ids=IDS)
def test_every_object_is_valid_against_its_schema(case_id: str, values: dict[str, Any] | None, version: str):
    for obj in manifests(values):
        assert schema_errors(obj, version) == [], f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version})"


@pytest.mark.parametrize("file_name", sorted(set(CRD_FILES.values())))
def test_vendored_crds_are_valid_custom_resource_definitions(file_name: str):
    doc = crd(file_name)
    kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    assert any(v["name"] == "v1" and v["served"] for v in doc["spec"]["versions"])


def test_schema_check_catches_a_misspelt_field_and_a_bad_pod_template():
    docs = manifests()
    rs = one(docs, "RayService")
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    errors = schema_errors(rs, K8S_VERSIONS[-1])
    assert any("enableInTreeAutoscalling" in e for e in errors), errors
    assert any("workerGroupSpecs.0.template.spec.containers.0.imagePullPolicy" in e for e in errors), errors
    pm = one(docs, "PodMonitor", "-head")
    pm["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert any("interval" in e for e in schema_errors(pm, K8S_VERSIONS[-1]))


def test_pod_templates_are_valid_core_v1_pod_templates():
    # the RayService check above resolves pod templates to core/v1; this asserts it does so (not a pass-through)
    rs = one(manifests(), "RayService")
    validator = k8s_type_validator("io.k8s.api.core.v1.PodTemplateSpec", K8S_VERSIONS[0])
    for group, template in pod_templates(rs).items():
        assert not list(validator.iter_errors(template)), group
    assert list(validator.iter_errors({"spec": {"containers": [{"name": "x", "bogus": 1}]}}))


def test_default_cluster_layout():
    rs = one(manifests(), "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert rs["metadata"]["name"] == f"{RELEASE}-quantserve"
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    [gpu] = cluster["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == ("gpu", 1, 1, 4)
    worker = container(gpu["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in gpu["template"]["spec"]["tolerations"]
    assert "nvidia.com/gpu" not in container(head["template"])["resources"]["limits"]
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_gpu_group_settings_and_extra_groups_render():
    values = merged(None, **{
        "gpuWorkers.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "gpuWorkers.gpus": 2, "gpuWorkers.minReplicas": 0, "gpuWorkers.replicas": 0, "gpuWorkers.maxReplicas": 8,
        "gpuWorkers.idleTimeoutSeconds": 900,
        "extraWorkerGroups": [{"groupName": "cpu", "maxReplicas": 3, "resources": {"limits": {"cpu": "4"}}}],
        "upgradeStrategy": {"type": "None"},
    })
    rs = one(manifests(values), "RayService")
    gpu, cpu = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert container(gpu["template"])["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu["idleTimeoutSeconds"]) == (0, 8, 900)
    assert (cpu["groupName"], cpu["minReplicas"], cpu["replicas"], cpu["maxReplicas"]) == ("cpu", 0, 1, 3)
    assert "nvidia.com/gpu" not in container(cpu["template"])["resources"]["limits"]
    assert "tolerations" not in cpu["template"]["spec"]
    assert rs["spec"]["upgradeStrategy"] == {"type": "None"}


@pytest.mark.parametrize("case_id,values", CASES, ids=IDS)
def test_metrics_and_serve_ports_agree_everywhere(case_id: str, values: dict[str, Any] | None):
    docs = manifests(values)
    rs = one(docs, "RayService")
    serve = (values or {}).get("serve", {})
    metrics_port = serve.get("metrics", {}).get("port", 8080)
    serve_port = serve.get("http", {}).get("port", 8000)
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == str(metrics_port)
        assert ports(group["template"])["metrics"] == metrics_port
        assert ports(group["template"])["serve"] == serve_port
    assert re.search(rf"^\s+port: {serve_port}$", rs["spec"]["serveConfigV2"], re.M)
    for pm in (d for d in docs if d["kind"] == "PodMonitor"):
        role = pm["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
        pod_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"] if role == "head" else \
            cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
        wanted = {k: v for k, v in pm["spec"]["selector"]["matchLabels"].items() if k != "ray.io/node-type"}
        assert wanted.items() <= pod_labels.items()  # KubeRay adds ray.io/node-type itself


def _mounts(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(template)["volumeMounts"]}


def _volumes(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in template["spec"]["volumes"]}


@pytest.mark.parametrize("source,extra,volume_key", [
    ("pvc", {"model.pvc.claimName": "weights"}, "persistentVolumeClaim"),
    ("hostPath", {"model.hostPath.path": "/data/models"}, "hostPath"),
    ("initContainer", {"model.initContainer.image": "busybox:1.36", "model.initContainer.command": ["true"]},
     "emptyDir"),
])
def test_model_weights_come_from_the_chosen_volume(source: str, extra: dict[str, Any], volume_key: str):
    rs = one(manifests(merged(None, **{"model.source": source, "model.mountOnHead": False}, **extra)), "RayService")
    templates = pod_templates(rs)
    worker = templates["gpu"]
    assert volume_key in _volumes(worker)["model"]
    assert _mounts(worker)["model"]["mountPath"] == "/models"
    assert _mounts(worker)["model"].get("readOnly", False) is (source != "initContainer")
    assert "model" not in _volumes(templates["head"])  # mountOnHead: false
    init = worker["spec"].get("initContainers", [])
    assert [c["name"] for c in init] == (["fetch-model"] if source == "initContainer" else [])
    if init:
        assert {"name": "QUANTSERVE_MODEL_DIR", "value": "/models"} in init[0]["env"]
        assert init[0]["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]


@pytest.mark.parametrize("source,extra,volume_key", [
    ("emptyDir", {}, "emptyDir"),
    ("pvc", {"cache.pvc.claimName": "autotune"}, "persistentVolumeClaim"),
    ("hostPath", {}, "hostPath"),
])
def test_autotune_cache_is_mounted_at_quantserve_cache_dir(source: str, extra: dict[str, Any], volume_key: str):
    rs = one(manifests(merged(None, **{"cache.source": source, "cache.mountPath": "/cache/qs"}, **extra)), "RayService")
    for group, template in pod_templates(rs).items():
        env = {e["name"]: e.get("value") for e in container(template)["env"]}
        assert env["QUANTSERVE_CACHE_DIR"] == "/cache/qs", group
        assert _mounts(template)["autotune-cache"]["mountPath"] == "/cache/qs"
        assert volume_key in _volumes(template)["autotune-cache"]


def test_pods_run_as_non_root_without_privilege_escalation():
    for case_id, values in CASES:
        rs = one(manifests(values), "RayService")
        for group, template in pod_templates(rs).items():
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True, (case_id, group)
            for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, (case_id, group, c["name"])


def test_pods_drain_before_they_stop():
    """A rolling upgrade or scale-down: preStop sleeps while the pod leaves the Service and its accepted requests
    finish (longer than the replicas' own graceful shutdown), and the grace period outlasts the sleep."""
    from quantserve.serve.config import ServeConfig

    for case_id, values in CASES:
        rs = one(manifests(values), "RayService")
        serve_grace = ServeConfig.model_fields["graceful_shutdown_timeout_s"].default  # the replicas' own drain
        for group, template in pod_templates(rs).items():
            spec = template["spec"]
            [container] = [c for c in spec["containers"] if c["name"].startswith("ray-")]
            sleep = container["lifecycle"]["preStop"]["exec"]["command"]
            assert sleep[0] == "sleep" and int(sleep[1]) > serve_grace, (case_id, group)
            assert spec["terminationGracePeriodSeconds"] > int(sleep[1]), (case_id, group)


def test_serve_proxy_gets_the_header_guard_with_the_configs_limits():
    """Every Ray container (each runs a Serve proxy) names the proxy guard and hands it the serve config's header
    limits; the guard reads them as the config would."""
    from quantserve.serve.proxy_guard import AUTOSCALING_ENV, CALLBACK, HeaderGuard, guard_from_environment

    for values, expected in ((None, HeaderGuard()),
                             (merged(None, **{"serve.limits": {"header_timeout_s": 4, "max_header_bytes": 8192,
                                                               "max_steps": 50}}), HeaderGuard(4.0, 8192, 100))):
        rs = one(manifests(values), "RayService")
        for group, template in pod_templates(rs).items():
            [ray] = [c for c in template["spec"]["containers"] if c["name"].startswith("ray-")]
            env = {e["name"]: e["value"] for e in ray["env"] if "value" in e}
            assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == CALLBACK, group
            assert guard_from_environment(env) == expected, (group, env["QUANTSERVE_PROXY_LIMITS"])
            for name, value in AUTOSCALING_ENV.items():  # autoscaling metrics pushed as often as `quantserve serve` does
                assert env[name] == value, (group, name)


def test_pod_templates_do_not_change_with_the_release_revision():
    # any change of rayClusterConfig makes KubeRay build a whole new Ray cluster: upgrades must not touch it by accident
    first, second = one(manifests(None, revision=1), "RayService"), one(manifests(None, revision=7), "RayService")
    assert first["spec"]["rayClusterConfig"] == second["spec"]["rayClusterConfig"]
    for template in pod_templates(first).values():
        labels = template["metadata"]["labels"]
        assert not any(k.startswith("helm.sh/") or k == "app.kubernetes.io/version" for k in labels)


def test_podmonitor_labels_and_dashboard_namespace_follow_values():
    values = merged(None, **{"metrics.podMonitor.labels": {"release": "kube-prometheus-stack"},
                             "metrics.dashboard.namespace": "monitoring",
                             "metrics.dashboard.labels": {"team": "ml", "grafana_dashboard": "1"}})
    docs = manifests(values)
    for pm in (d for d in docs if d["kind"] == "PodMonitor"):
        assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    cm = one(docs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["labels"]["team"] == "ml"
    assert [d["kind"] for d in manifests(merged(None, **{"metrics.podMonitor.enabled": False,
                                                          "metrics.dashboard.enabled": False}))] == ["RayService"]


def test_release_name_is_kept_within_kuberays_limit():
    rs = one(manifests(merged(None, nameOverride="quantserve-with-a-very-long-name-override-for-testing-limits")),
             "RayService")
    name = rs["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


# Bad values: refused by values.schema.json (HelmValuesError) or by the chart's own checks (HelmRenderError), with a
# message that names the field.
BAD_VALUES = [
    ({"serve.variants": [{"name": "a", "quantisation": "nf4"}]}, helm.HelmValuesError, "quantisation"),
    ({"serve.variants": [{"name": "a b"}]}, helm.HelmValuesError, "/serve/variants/0/name"),
    ({"serve.variants": []}, helm.HelmValuesError, "/serve/variants"),
    ({"serve.experiment.weights": {"nf5": 1}}, helm.HelmRenderError, 'serve.experiment.weights: unknown variant "nf5"'),
    ({"serve.experiment.shadow": {"variant": "fp8", "sample_rate": 0.1}}, helm.HelmRenderError,
     "serve.experiment.shadow.variant"),
    ({"serve.http": {"host": "127.0.0.1", "port": 8000}}, helm.HelmRenderError, "serve.http.host"),
    ({"gpuWorkers.enabled": False}, helm.HelmRenderError, "no worker group"),
    ({"gpuWorkers.gpus": 0}, helm.HelmRenderError, "resources.num_gpus"),
    ({"gpuWorkers.minReplicas": 3}, helm.HelmRenderError, "minReplicas <= replicas <= maxReplicas"),
    ({"extraWorkerGroups": [{"groupName": "gpu"}]}, helm.HelmRenderError, 'groupName "gpu" is used twice'),
    ({"model.source": "pvc"}, helm.HelmRenderError, "model.pvc.claimName"),
    ({"model.source": "s3"}, helm.HelmValuesError, "/model/source"),
    ({"cache.source": "pvc"}, helm.HelmRenderError, "cache.pvc.claimName"),
    ({"head.rayStartParams": {"metrics-export-port": "9090"}}, helm.HelmRenderError, "serve.metrics.port"),
    ({"upgradeStrategy": {"type": "Recreate"}}, helm.HelmValuesError, "/upgradeStrategy/type"),
    ({"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}}, helm.HelmValuesError, "gatewayClassName"),
    ({"gpuWorker": {"enabled": True}}, helm.HelmValuesError, "gpuWorker"),
    ({"shutdown": {"preStopSleepSeconds": 60, "terminationGracePeriodSeconds": 30}}, helm.HelmRenderError,
     "shutdown.terminationGracePeriodSeconds (30) must be above shutdown.preStopSleepSeconds (60)"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_VALUES, ids=[m for _, _, m in BAD_VALUES])
def test_bad_values_are_refused_with_a_message_naming_the_field(overrides: dict[str, Any], error: type, message: str):
    with helm.Chart.load(CHART) as chart:
        values = merged(None, **overrides)
        with pytest.raises(error) as info:
            chart.validate_schema(values)
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(info.value)
