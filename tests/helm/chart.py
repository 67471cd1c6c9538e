"""Render helm/quantserve with a real Helm engine and check the manifests against Kubernetes and CRD schemas.

Helm: `helm-python-sdk` (import helm_python), which embeds Helm's own Go SDK (v4) as a shared library: the same template
engine, values coalescing and values.schema.json validation as the `helm` command, offline. Kubernetes schemas: the
`kubernetes-validate` package's JSON schemas (strict variants: unknown fields are errors). CRDs: the vendored
openAPIV3Schema files in tests/helm/schemas/, whose core/v1 objects are checked against kubernetes-validate's schemas.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "quantserve"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RELEASE, NAMESPACE = "qs", "serving"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
# the oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest kubernetes-validate knows
K8S_VERSIONS = ("1.25", kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()))
CRD_FILES = {("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
             ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml"}


def values_cases() -> list[tuple[str, dict[str, Any] | None]]:
    """(id, values) for the chart's defaults and every example values file."""
    return [("default", None)] + [(p.stem, yaml.safe_load(p.read_text())) for p in EXAMPLES]


@functools.cache
def _render(values_json: str, revision: int) -> tuple[tuple[str, str], ...]:
    with helm.Chart.load(CHART) as chart:
        values = json.loads(values_json)
        chart.validate_schema(values)
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, revision=revision)
    return tuple(sorted(out.items()))


def render(values: dict[str, Any] | None = None, revision: int = 1) -> dict[str, str]:
    """template path -> rendered text, for values over the chart's defaults (validated against values.schema.json)."""
    return dict(_render(json.dumps(values, sort_keys=True), revision))


def manifests(values: dict[str, Any] | None = None, revision: int = 1) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects (NOTES.txt and empty documents left out)."""
    docs = []
    for path, text in render(values, revision).items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def one(docs: Iterable[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def merged(base: dict[str, Any] | None, **overrides: Any) -> dict[str, Any]:
    """A deep copy of base with dotted-path overrides: merged(v, **{"serve.experiment.weights": {...}})."""
    out = copy.deepcopy(base or {})
    for dotted, value in overrides.items():
        node = out
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


# --- Kubernetes schemas -----------------------------------------------------------------------------------------

def _schema_dir(version: str) -> Path:
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    matches = sorted(p for p in base.iterdir() if p.name.startswith(f"v{version}.") and p.name.endswith("-strict"))
    assert matches, f"kubernetes-validate has no strict schemas for {version}"
    return matches[-1]


@functools.cache
def _k8s_registry(version: str) -> Registry:
    defs = json.loads((_schema_dir(version) / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


def k8s_type_validator(type_name: str, version: str) -> jsonschema.protocols.Validator:
    """A validator for one Kubernetes definition, e.g. io.k8s.api.core.v1.PodTemplateSpec (strict)."""
    return jsonschema.Draft202012Validator({"$ref": f"{K8S_DEFS_ID}#/$defs/{type_name}"},
                                           registry=_k8s_registry(version))


def _crd_node_to_jsonschema(node: Any) -> Any:
    """A CRD openAPIV3Schema node as JSON Schema: objects closed (strict field validation), core types by $ref."""
    if not isinstance(node, dict):
        return node
    first_word = (node.get("description") or "").split(" ")[0]
    if node.get("x-kubernetes-preserve-unknown-fields") and first_word.startswith("io.k8s."):
        return {"$ref": f"{K8S_DEFS_ID}#/$defs/{first_word}"}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _crd_node_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _crd_node_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_crd_node_to_jsonschema(sub) for sub in value]
        elif key == "format" and value in ("int32", "int64"):
            bits = 31 if value == "int32" else 63
            out.setdefault("minimum", -(2 ** bits))
            out["maximum"] = 2 ** bits - 1
        elif key.startswith("x-kubernetes-") or key in ("format", "nullable", "default", "description"):
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def crd(file_name: str) -> dict[str, Any]:
    return yaml.safe_load((SCHEMAS / file_name).read_text())


@functools.cache
def _crd_validator(file_name: str, api_version: str, version: str) -> jsonschema.protocols.Validator:
    doc = crd(file_name)
    served = {v["name"]: v for v in doc["spec"]["versions"]}[api_version.split("/")[1]]
    schema = _crd_node_to_jsonschema(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": doc["spec"]["names"]["kind"]}
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry(version))


def _errors(validator: jsonschema.protocols.Validator, obj: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def schema_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Errors of one object: a CRD kind against its vendored CRD, other kinds against kubernetes-validate's schema."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_FILES:
        return _errors(_crd_validator(CRD_FILES[key], obj["apiVersion"], version), obj)
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '(root)'}: {exc.message}"]
    return []


def serve_config_v2(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """group name ('head' for the head) -> pod template."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster.get("workerGroupSpecs", [])})
    return out


def container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def ports(template: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(template).get("ports", [])}


GRAFANA_VARIABLE = re.compile(r"\$(\{\w+\}|__rate_interval|__interval|__range|[A-Za-z_]\w*)")


def substitute_grafana_variables(expr: str) -> str:
    """A dashboard expression as PromQL: intervals become 5m, template variables .* (inside a matcher's quotes)."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1).strip("{}")
        return "5m" if name.startswith("__") else ".*"
    return GRAFANA_VARIABLE.sub(sub, expr)
