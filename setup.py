"""fastdiff: diffusion sampling steps as fused Triton kernels.

``kernels/`` is installed as ``fastdiff.kernels`` (a top-level package named ``kernels``
already exists on PyPI, so it must not be installed under that name).
"""

from setuptools import setup

setup(
    name="fastdiff",
    version="0.1.0",
    description="Diffusion-model samplers whose reverse steps run as fused Triton GPU kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "fastdiff",
        "fastdiff.diffusers",
        "fastdiff.k_diffusion",
        "fastdiff.kernels",
        "fastdiff.reference",
        "fastdiff.sample_many",
    ],
    package_dir={"fastdiff": "fastdiff", "fastdiff.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.6", "numpy", "tqdm", "matplotlib"],
    extras_require={
        # torchsde and torchdiffeq: what k_diffusion.sampling imports (the parity tests load
        # k-diffusion itself, installed with --no-deps by README's test command).
        "test": ["pytest>=8", "pytest-benchmark>=4", "scipy", "ruff", "torchsde", "torchdiffeq"],
        "k-diffusion": ["torchsde"],  # sample_dpmpp_2m_sde's default Brownian-tree noise
        "diffusers": ["diffusers>=0.30", "transformers"],
    },
    entry_points={"console_scripts": ["fastdiff=fastdiff.__main__:main"]},
)
