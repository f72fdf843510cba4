"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3): choose the EMA length after training.

A power-function EMA with exponent g averages the weights theta(tau) seen up to step t with the profile
    w_{g,t}(tau) = (g + 1) tau^g / t^(g + 1),   0 < tau <= t,
whose relative width (std / t) is sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))). Tracked step by step it is
    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(g + 1).
Training keeps two such averages (sigma_rel 0.05 and 0.10, as EDM2 does) and saves them at intervals
(snapshots). An average of any other length at any step is then a least-squares combination of the
snapshots: the coefficients x minimise || sum_i x_i w_i - w_target ||^2 over tau, solved from the profiles'
inner products, which have a closed form.
"""

from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch


def exponent(sigma_rel: float) -> float:
    """The power-function exponent g of relative width sigma_rel: the largest real root of
    (g + 2)^2 (g + 3) = s (g + 1), s = sigma_rel^-2, i.e. of g^3 + 7 g^2 + (16 - s) g + (12 - s)."""
    s = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def beta(sigma_rel: float, step: int) -> float:
    """The decay of the power-function average of width sigma_rel at (1-based) optimizer step `step`."""
    return (1.0 - 1.0 / step) ** (exponent(sigma_rel) + 1.0)


def inner_product(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<w_{g_a,t_a}, w_{g_b,t_b}> = integral over tau of the two profiles' product (broadcast):
    (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) max(t_a, t_b)) * (min / max)^(the longer one's exponent)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    shorter_a = t_a < t_b
    ratio = np.where(shorter_a, t_a / t_b, t_b / t_a)
    power = np.where(shorter_a, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio**power


def coefficients(snapshots: Sequence[Tuple[int, float]], target: Tuple[int, float]) -> np.ndarray:
    """Least-squares weights [len(snapshots)] of snapshots (step, sigma_rel) that best make the profile of
    target (step, sigma_rel)."""
    t = np.array([s for s, _ in snapshots], dtype=np.float64)
    g = np.array([exponent(r) for _, r in snapshots])
    gram = inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = inner_product(t, g, np.float64(target[0]), np.float64(exponent(target[1])))
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def reconstruct(
    snapshots: Sequence[Tuple[int, float]],
    load: Callable[[int, float], Dict[str, torch.Tensor]],
    step: int,
    sigma_rel: float,
) -> Dict[str, torch.Tensor]:
    """The power-function average of width sigma_rel at `step` from snapshots (step, sigma_rel), taken at or
    before it, whose state_dicts load(step, sigma_rel) gives one at a time: their float64 weighted sum,
    returned in float32."""
    weights = coefficients(snapshots, (step, sigma_rel))
    total: Dict[str, torch.Tensor] = {}
    for w, (s, r) in zip(weights, snapshots):
        for name, value in load(s, r).items():
            total[name] = total.get(name, 0) + float(w) * value.double()
    return {name: value.float() for name, value in total.items()}
