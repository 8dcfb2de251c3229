"""k-diffusion's sigma schedules and noise samplers (``k_diffusion.sampling``'s
``get_sigmas_karras``, ``get_sigmas_exponential``, ``default_noise_sampler``,
``BrownianTreeNoiseSampler``), used by and re-exported from ``fastdiff.k_diffusion``.

Example:
    >>> sigmas = get_sigmas_karras(20, 0.03, 14.6)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "BrownianTreeNoiseSampler",
    "NoiseSampler",
    "default_noise_sampler",
    "get_sigmas_exponential",
    "get_sigmas_karras",
]

NoiseSampler = Callable[[Tensor, Tensor], Tensor]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu"
) -> Tensor:
    """The noise levels of Karras et al. 2022 eq. 5, ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho)
    - s_max^(1/rho)))^rho``, then a 0 (float32, as k-diffusion).

    Example:
        >>> get_sigmas_karras(3, 0.1, 10.0)
        tensor([10.0000,  1.6030,  0.1000,  0.0000])
    """
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> Tensor:
    """Noise levels evenly spaced in log sigma from sigma_max to sigma_min, then a 0.

    Example:
        >>> get_sigmas_exponential(3, 0.1, 10.0)
        tensor([10.0000,  1.0000,  0.1000,  0.0000])
    """
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device)
    return _append_zero(log_sigmas.exp())


def default_noise_sampler(x: Tensor) -> NoiseSampler:
    """k-diffusion's default: a fresh ``torch.randn_like(x)`` per call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


class BrownianTreeNoiseSampler:
    """k-diffusion's ``BrownianTreeNoiseSampler``: standardized increments
    ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)`` of one ``torchsde.BrownianTree`` per seed over
    ``[sigma_min, sigma_max]`` (one seed: drawn with ``torch.randint`` from the global
    generator, as k-diffusion; a list: one tree per batch entry).

    Example:
        >>> ns = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=0)
        >>> z = ns(torch.tensor(14.6), torch.tensor(9.7))
    """

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed=None, transform=lambda s: s):
        try:
            import torchsde
        except ImportError as e:  # pragma: no cover - torchsde is in the test extra
            raise ImportError(
                "BrownianTreeNoiseSampler (the default noise_sampler of sample_dpmpp_2m_sde) "
                "needs torchsde: pip install torchsde, or pass noise_sampler="
            ) from e
        self.transform = transform
        t0 = transform(torch.as_tensor(sigma_min))
        t1 = transform(torch.as_tensor(sigma_max))
        t0, t1, self._sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self._batched = isinstance(seed, (list, tuple))
        seeds = list(seed) if self._batched else [seed]
        if self._batched and len(seeds) != x.shape[0]:
            raise ValueError(f"seed: {len(seeds)} seeds for a batch of {x.shape[0]}")
        w0 = torch.zeros_like(x[0] if self._batched else x)
        self._trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        return (w if self._batched else w[0]) / (t1 - t0).abs().sqrt()
