"""quantserve.kernels: packed weight formats, torch reference dequantizers and Triton kernels."""
