"""quantserve.serve: the Ray Serve application (ingress, A/B router, model deployments, metrics)."""

# Lazy exports: the config and A/B logic import without Ray; the application pulls in Ray Serve on first use.
_EXPORTS = {
    "ServeConfig": "config", "VariantConfig": "config", "ExperimentConfig": "config", "ConfigError": "config",
    "default_config": "config", "load_config": "config", "parse_config": "config",
    "Splitter": "ab", "Assignment": "ab", "UnknownVariantError": "ab",
    "PipelineFamily": "protocol", "ServedPipeline": "protocol", "ModelSource": "protocol", "ClientError": "protocol",
    "ExtraField": "protocol", "JobResult": "protocol", "families": "families", "register_family": "families",
    "TextToImageFamily": "text_to_image",
    "build_app": "app", "build_application": "app", "ray_serve_config": "app",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
