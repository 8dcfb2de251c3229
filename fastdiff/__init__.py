"""fastdiff: diffusion-model samplers whose reverse steps run as fused Triton kernels."""

__version__ = "0.1.0"
