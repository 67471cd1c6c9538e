"""A serve config and helm/quantserve's KubeRay RayService: the chart's `serve:` values, and back from serveConfigV2.

The chart renders `serveConfigV2` in the shape of `app.ray_serve_config`: the serve config (less experiment, http and
metrics) as the application's `args`, the experiment as the Ingress's `user_config`, http as `http_options`. This
module goes the other way, so a rendered chart can be checked with the same pydantic model that `quantserve serve`
uses, and turns a serve config file into the chart's values. No Ray and no Kubernetes library: it imports anywhere.

    python -m quantserve.serve.rayservice values examples/serve.yaml      # the `serve:` block for a values file
    helm template qs helm/quantserve -f my-values.yaml | python -m quantserve.serve.rayservice check -
    python -m quantserve.serve.rayservice schema helm/quantserve/values.schema.json [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from quantserve.kernels.atomic_write import atomic_write_text

from .config import ConfigError, ServeConfig, load_config, parse_config

# The same strings as serve.app's IMPORT_PATH and EXPERIMENT_DEPLOYMENT (tests/helm holds them equal); repeated here
# so that this module imports without Ray. LEGACY_EXPERIMENT_DEPLOYMENT: where configs rendered before issue 13 put
# the experiment (a deployment of its own then), still read.
IMPORT_PATH = "quantserve.serve.app:build_app"
EXPERIMENT_DEPLOYMENT = "Ingress"
LEGACY_EXPERIMENT_DEPLOYMENT = "ABRouter"
CLUSTER_HOST = "0.0.0.0"  # in a pod, Serve's proxies listen on every interface, or the Service cannot reach them
SERVE_EXCLUDED_FROM_ARGS = ("experiment", "http", "metrics")  # what ray_serve_config keeps out of `args`
SERVE_SCHEMA_REF = "#/properties/serve/$defs/"  # where the serve schema's definitions sit in values.schema.json


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def quantserve_application(ray_config: Mapping[str, Any], app_name: str | None = None) -> dict[str, Any]:
    """The application of a Ray Serve config that runs quantserve's builder (the one named app_name, if given)."""
    apps = ray_config.get("applications")
    if not isinstance(apps, list):
        raise ConfigError("serveConfigV2.applications: expected a list of applications")
    found = [(i, a) for i, a in enumerate(apps) if isinstance(a, Mapping) and a.get("import_path") == IMPORT_PATH
             and (app_name is None or a.get("name") == app_name)]
    if len(found) != 1:
        wanted = f"named {app_name!r} " if app_name else ""
        raise ConfigError(f"serveConfigV2.applications: expected exactly one application {wanted}with import_path "
                          f"{IMPORT_PATH!r}, found {len(found)}")
    return dict(found[0][1])


def serve_config_from_v2(document: str | Mapping[str, Any], app_name: str | None = None,
                         metrics_port: int | None = None) -> ServeConfig:
    """The ServeConfig that a serveConfigV2 (a Ray Serve config, YAML text or parsed) deploys.

    args + the Ingress's user_config as `experiment` + http_options' host and port as `http`; a ConfigError names
    the field. Deployment overrides other than the Ingress's user_config are refused: quantserve's builder sets
    every deployment from args, and an override would silently win over them.
    """
    if isinstance(document, str):
        try:
            document = yaml.safe_load(document)
        except yaml.YAMLError as exc:
            raise ConfigError(f"serveConfigV2: not valid YAML: {exc}") from None
    ray_config = _mapping(document, "serveConfigV2")
    app = quantserve_application(ray_config, app_name)
    where = f"serveConfigV2.applications[{app.get('name')}]"
    data = _mapping(app.get("args") or {}, f"{where}.args")
    if "config" in data:
        raise ConfigError(f"{where}.args.config: a config file path inside the pod cannot be checked here; "
                          f"put the serve config itself under args")
    clash = [k for k in SERVE_EXCLUDED_FROM_ARGS if k in data]
    if clash:
        raise ConfigError(f"{where}.args: {', '.join(clash)} belong outside args (the Ingress's user_config, "
                          f"http_options, rayStartParams), got them inside")
    for i, dep in enumerate(app.get("deployments") or []):
        dep = _mapping(dep, f"{where}.deployments[{i}]")
        if dep.get("name") not in (EXPERIMENT_DEPLOYMENT, LEGACY_EXPERIMENT_DEPLOYMENT) or set(dep) - {"name",
                                                                                                    "user_config"}:
            raise ConfigError(f"{where}.deployments[{i}]: only {{name: {EXPERIMENT_DEPLOYMENT}, user_config: ...}} is "
                              f"expected (the experiment); variant settings belong in args.variants, got {dep}")
        data["experiment"] = _mapping(dep.get("user_config") or {}, f"{where}.deployments[{i}].user_config")
    http = _mapping(ray_config.get("http_options") or {}, "serveConfigV2.http_options")
    data["http"] = {k: http[k] for k in ("host", "port") if k in http}
    if metrics_port is not None:
        data["metrics"] = {"port": metrics_port}
    return parse_config(data, where)


def chart_values(cfg: ServeConfig) -> dict[str, Any]:
    """The chart's `serve:` values for a serve config: what differs from the defaults, with http on every interface."""
    values = cfg.model_dump(mode="json", exclude_defaults=True)
    values["http"] = {"host": CLUSTER_HOST, "port": cfg.http.port}
    values["metrics"] = {"port": cfg.metrics.port}
    return values


def serve_values_schema() -> dict[str, Any]:
    """The JSON schema of the chart's `serve` value, generated from the ServeConfig pydantic model.

    Self-contained: its $defs stay inside it and its references point there (#/properties/serve/$defs/...), so it
    sits in values.schema.json beside the chart's own definitions.
    """
    schema = ServeConfig.model_json_schema(ref_template=SERVE_SCHEMA_REF + "{model}")
    schema["description"] = ("The quantserve serve config (the schema of `quantserve serve CONFIG.yaml`, "
                             "serve/config.py), generated by `python -m quantserve.serve.rayservice schema`.")
    return schema


def sync_values_schema(path: Path) -> bool:
    """Write the generated `serve` schema into a values.schema.json; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    doc = json.loads(text)
    doc.setdefault("properties", {})["serve"] = serve_values_schema()
    new = json.dumps(doc, indent=2) + "\n"
    if new == text:
        return False
    atomic_write_text(path, new)
    return True


def rayservices(manifests: str) -> list[dict[str, Any]]:
    """The RayService objects in a multi-document YAML stream (e.g. `helm template` output)."""
    return [d for d in yaml.safe_load_all(manifests) if isinstance(d, dict) and d.get("kind") == "RayService"]


def metrics_port_of(rayservice: Mapping[str, Any]) -> int | None:
    """The metrics port a RayService's head starts Ray's metrics agent on (rayStartParams metrics-export-port)."""
    head = rayservice.get("spec", {}).get("rayClusterConfig", {}).get("headGroupSpec", {})
    port = (head.get("rayStartParams") or {}).get("metrics-export-port")
    return int(port) if port is not None else None


def describe(cfg: ServeConfig) -> str:
    """One line: the app, each variant's scheme, replica range and GPUs, and the A/B split."""
    weights = cfg.experiment.resolved_weights(cfg.variant_names)
    total = sum(weights.values())
    split = ", ".join(f"{name} {100 * w / total:.0f}%" for name, w in weights.items())
    variants = ", ".join(f"{v.name} ({v.scheme_label}, {v.autoscaling.min_replicas}-{v.autoscaling.max_replicas} "
                         f"replicas, {v.resources.num_gpus:g} GPU each)" for v in cfg.variants)
    return f"app {cfg.app_name}: {variants}; split {split}"


def _cmd_values(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    sys.stdout.write(yaml.safe_dump({"serve": chart_values(cfg)}, sort_keys=False))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.manifests == "-" else Path(args.manifests).read_text(encoding="utf-8")
    found = rayservices(text)
    if not found:
        print("rayservice check: no RayService in the manifests", file=sys.stderr)
        return 1
    for rs in found:
        name = rs.get("metadata", {}).get("name", "?")
        cfg = serve_config_from_v2(rs.get("spec", {}).get("serveConfigV2", ""), metrics_port=metrics_port_of(rs))
        print(f"RayService {name}: {describe(cfg)}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    path = Path(args.values_schema)
    if args.check:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("properties", {}).get("serve") != serve_values_schema():
            print(f"{path}: the serve schema is out of date; run without --check to regenerate it", file=sys.stderr)
            return 1
        return 0
    print(f"{path}: {'updated' if sync_values_schema(path) else 'up to date'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantserve.serve.rayservice",
                                     description="Serve configs and the helm/quantserve chart's RayService.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("values", help="print the chart's `serve:` values for a serve config YAML")
    p.add_argument("config")
    p.set_defaults(func=_cmd_values)
    p = sub.add_parser("check", help="parse each RayService's serveConfigV2 with the serve config model")
    p.add_argument("manifests", help="rendered manifests (YAML), or - for standard input")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("schema", help="regenerate the serve part of a values.schema.json from the ServeConfig model")
    p.add_argument("values_schema")
    p.add_argument("--check", action="store_true", help="only check that it is up to date (exit 1 if not)")
    p.set_defaults(func=_cmd_schema)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        print(f"rayservice {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
