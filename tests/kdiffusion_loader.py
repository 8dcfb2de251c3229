"""The real ``k_diffusion.sampling`` (PyPI ``k-diffusion``) for the parity tests, imported
without the package's ``__init__``, which imports its training stack (clip, kornia, wandb,
torchvision, ...). CI installs the package with ``pip install --no-deps`` (see README's
test command) beside ``torchsde`` and ``torchdiffeq`` (the test extra): ``sampling.py``
imports those, scipy, tqdm and ``k_diffusion.utils``, whose torchvision import (image
helpers that sampling never calls) is stood in for while it loads if torchvision is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def load_sampling():
    """``k_diffusion.sampling``, or skip the test when k-diffusion is not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        functional = types.ModuleType("torchvision.transforms.functional")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        vision = types.ModuleType("torchvision")
        vision.transforms = transforms
        stubs = {
            "torchvision": vision,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    sys.modules["k_diffusion"] = package
    sys.modules.update(stubs)
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name in stubs:  # others probe torchvision with find_spec: leave no stub behind
            sys.modules.pop(name, None)
