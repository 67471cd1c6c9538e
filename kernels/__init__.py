"""quantserve.kernels: packed weight formats, torch reference dequantizers and Triton kernels."""

if __name__ != "quantserve.kernels":  # the repository root is on sys.path (python -m from the root)
    # This folder imports only as quantserve.kernels. Libraries probe for a top-level `kernels` package
    # (bitsandbytes and diffusers look for Hugging Face's `kernels`); refuse to pose as it.
    raise ImportError(f"{__name__!r} is not this package: this folder is quantserve.kernels")

