"""Likelihood helpers for Gaussian diffusion (Nichol & Dhariwal 2021, Sec. 2 and App. A).

All functions broadcast their arguments elementwise; log-variances are natural logs.
"""

import math
from typing import Union

import torch

TensorOrFloat = Union[torch.Tensor, float]


def normal_kl(
    mean1: TensorOrFloat, logvar1: TensorOrFloat, mean2: TensorOrFloat, logvar2: TensorOrFloat
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python float; at least one must be a tensor.
    """
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        # A float becomes a float32 tensor first (as in improved-diffusion), then takes tensor's dtype.
        a if isinstance(a, torch.Tensor) else torch.tensor(a).to(tensor)
        for a in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by the paper's decoder L_0."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of images discretised to 256 bins under N(means, exp(log_scales)^2).

    :param x: targets rescaled from uint8 {0..255} to [-1, 1], any shape.
    :param means, log_scales: same shape as x; log_scales is log(std).
    :return: per-element log-probabilities (nats). The outermost bins take
        all the mass of the tails, so the 256 bin probabilities sum to 1.
    """
    assert x.shape == means.shape == log_scales.shape
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    half_bin = 1.0 / 255.0
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
    assert log_probs.shape == x.shape
    return log_probs
