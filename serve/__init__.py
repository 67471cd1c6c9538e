"""quantserve.serve: the Ray Serve application (ingress, A/B router, model deployments, metrics)."""

if __name__ != "quantserve.serve":  # the repository root is on sys.path (python -m from the root)
    # This folder imports only as quantserve.serve. Libraries probe for a top-level `serve` package
    # (bitsandbytes and diffusers look for Hugging Face's `kernels`); refuse to pose as it.
    raise ImportError(f"{__name__!r} is not this package: this folder is quantserve.serve")

