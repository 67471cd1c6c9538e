"""build_app: a serve config in, a Ray Serve application out (Ingress, with the A/B router inside, -> one Diffusion
deployment per variant).

It is a Ray Serve application builder, so Ray's own CLI deploys the same config:

    serve run quantserve.serve.app:build_app config=examples/serve.yaml

or, in a Ray Serve config file for `serve deploy` / KubeRay, `import_path: quantserve.serve.app:build_app` with the
serve config under `args` (see `ray_serve_config`). With no args it serves `default_config()`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from .config import ConfigError, ServeConfig, default_config, load_config, parse_config
from .diffusion import Diffusion
from .families import resolve
from .ingress import Ingress

IMPORT_PATH = "quantserve.serve.app:build_app"
EXPERIMENT_DEPLOYMENT = "Ingress"  # the deployment whose user_config is the experiment

__all__ = ["IMPORT_PATH", "build_app", "build_application", "config_from_args", "default_config", "ray_serve_config"]


def config_from_args(args: dict[str, Any] | None) -> ServeConfig:
    """{"config": "path.yaml"} (as `serve run ... config=path.yaml` passes), an inline serve config, or {}."""
    args = dict(args or {})
    if not args:
        return default_config()
    if "config" in args:
        if len(args) > 1:
            raise ConfigError(f"build_app args: 'config' (a YAML path) cannot be combined with other keys, got {sorted(args)}")
        return load_config(args["config"])
    return parse_config(args, "build_app args")


def build_application(cfg: ServeConfig) -> Application:
    """Bind the deployments for a validated config."""
    variants = {}
    for i, v in enumerate(cfg.variants):
        handle = Diffusion.options(
            name=v.deployment_name,
            ray_actor_options=v.ray_actor_options(),
            autoscaling_config=v.autoscaling.to_ray(),
            max_ongoing_requests=v.max_ongoing_requests,
            max_queued_requests=v.max_queued_requests,
            health_check_period_s=v.health_check_period_s,
            graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
            max_constructor_retry_count=3,  # a model that fails to load fails the deploy soon, with its reason
        ).bind(v.model_dump(mode="json"), cfg.variant_limits(v.name).to_dict(), i)
        variants[v.name] = {"scheme": v.scheme_label, "deployment": v.deployment_name, "handle": handle,
                            "min_replicas": v.autoscaling.min_replicas,
                            "family": resolve(v.model, f"variants.{i}.model")[0].name}
    return Ingress.options(
        name=EXPERIMENT_DEPLOYMENT,
        num_replicas=cfg.ingress.num_replicas,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        user_config=cfg.experiment.model_dump(mode="json"),
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
    ).bind(variants, cfg.limits.model_dump(mode="json"), cfg.request_timeout_s, cfg.auth.ingress_args(),
           cfg.retry_after_s)


def build_app(args: dict) -> Application:
    """Ray Serve application builder: `serve run quantserve.serve.app:build_app [config=FILE.yaml]`."""
    return build_application(config_from_args(args))


def ray_serve_config(cfg: ServeConfig, route_prefix: str = "/") -> dict[str, Any]:
    """The same application as a Ray Serve config (`serve deploy`, KubeRay RayService).

    The experiment is the Ingress's user_config override, outside `args`: editing only the weights (or salt, or
    shadow) and deploying again is a lightweight update that reconfigures the router without restarting a replica.
    """
    args = cfg.model_dump(mode="json", exclude={"experiment", "http", "metrics"})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": route_prefix,
            "import_path": IMPORT_PATH,
            "args": args,
            "deployments": [{"name": EXPERIMENT_DEPLOYMENT, "user_config": cfg.experiment.model_dump(mode="json")}],
        }],
    }
