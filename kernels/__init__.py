"""Fused Triton kernels of fastdiff (installed as ``fastdiff.kernels``)."""
