"""Gaussian diffusion: the forward process q, the learned reverse process p, their losses and samplers.

Notation follows Nichol & Dhariwal (2021), "Improved Denoising Diffusion
Probabilistic Models": beta_t is the noise schedule, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, and the posterior q(x_{t-1} | x_t, x_0) has
mean mu~_t and variance beta~_t. Schedules and posteriors are precomputed in
float64 numpy and gathered per timestep as float32, as the paper's code does.
Timesteps are 0-indexed: t = 0 is the paper's t = 1.
"""

import collections
import enum
import math
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, normal_kl

# model(x_t [N, C, ...], t [N], **model_kwargs) -> [N, C, ...] (or [N, 2C, ...] with learned variances).
Model = Callable[..., torch.Tensor]
ModelKwargs = Optional[Dict[str, torch.Tensor]]  # extra model inputs, e.g. {"y": labels [N]}
DenoisedFn = Optional[Callable[[torch.Tensor], torch.Tensor]]  # applied to the x_0 prediction
Moments = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mean, variance, log-variance


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Return the float64 betas [T] of a named schedule.

    "linear": DDPM's betas from 1e-4 to 0.02, scaled by 1000 / T so that any
    T gives the same end points of alpha_bar as T = 1000.
    "cosine": the paper's Eq. 17, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)
    with s = 0.008, betas clipped at 0.999.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown beta schedule: {schedule_name!r} (expected 'linear' or 'cosine')")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into float64 betas [T].

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta); the
    clip avoids the singularity of the cosine schedule at t = 1.
    """
    abar = np.array(
        [alpha_bar(i / num_diffusion_timesteps) for i in range(num_diffusion_timesteps + 1)], dtype=np.float64
    )
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise epsilon


class ModelVarType(enum.Enum):
    """How the reverse-process variance Sigma_theta(x_t, t) is obtained.

    LEARNED_RANGE is the paper's Eq. 15: the model outputs v in [-1, 1] and
    Sigma = exp(v' log beta_t + (1 - v') log beta~_t) with v' = (v + 1) / 2.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()  # beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # simple loss; plus L_vlb when variances are learned
    RESCALED_MSE = enum.auto()  # L_hybrid = L_simple + 0.001 L_vlb (paper Eq. 16)
    KL = enum.auto()  # the variational bound L_vlb
    RESCALED_KL = enum.auto()  # L_vlb scaled by T, as DDPM's L_vlb sum

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [N, ...] -> [N]."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def _extract_into_tensor(
    arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]
) -> torch.Tensor:
    """Gather arr[timesteps] as float32 and broadcast it to [N, 1, ...] of broadcast_shape."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return res.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


def _last(iterator: Iterator):
    """The final item of an iterator (a sampling loop's x_0)."""
    return collections.deque(iterator, maxlen=1)[0]


class GaussianDiffusion:
    """Training and sampling utilities for a diffusion process with given betas.

    :param betas: float64 array [T] of per-step betas, each in (0, 1].
    :param model_mean_type: what the model predicts (ModelMeanType).
    :param model_var_type: how the variance is obtained (ModelVarType).
    :param loss_type: the training objective (LossType).
    :param rescale_timesteps: feed the model t * 1000 / T (floats) so that it
        sees the same timestep range whatever T is.
    :param snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023) of the mse term; 0 = off (improved-
        diffusion's losses).
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
        snr_gamma: float = 0.0,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with every value in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0): beta~_t (Eq. 10) and mu~_t (Eq. 11)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 is 0; its log is clipped to beta~_1 so log-variances stay finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Min-SNR-gamma: the x_0 error weighted by min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t),
        # so the many low-noise steps, whose x_0 is nearly given, stop dominating the gradient. An eps
        # error is SNR_t times an x_0 error (x_0 - x0_hat = (eps_hat - eps) / sqrt(SNR_t)), hence min(SNR_t,
        # gamma) / SNR_t for eps prediction.
        self.snr_gamma = snr_gamma
        self.mse_weights = None
        if snr_gamma:
            if model_mean_type == ModelMeanType.PREVIOUS_X:
                raise ValueError("Min-SNR weighting is defined for eps and x_0 prediction, not x_{t-1}")
            snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
            clipped = np.minimum(snr, snr_gamma)
            self.mse_weights = clipped / snr if model_mean_type == ModelMeanType.EPSILON else clipped

    # ------------------------------------------------------------------ q
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> Moments:
        """Mean, variance and log-variance of q(x_t | x_0); each broadcast to x_start's shape [N, ...]."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, shape [N, ...]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Moments:
        """Mean mu~_t, variance beta~_t and clipped log beta~_t of q(x_{t-1} | x_t, x_0), each [N, ...]."""
        assert x_start.shape == x_t.shape
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ p
    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: ModelKwargs = None,
    ) -> Dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        :param model: called as model(x, scaled_t, **model_kwargs), returning
            [N, C, ...] or, for learned variances, [N, 2C, ...].
        :param x: x_t, [N, C, ...]; t: [N] integer timesteps.
        :param clip_denoised: clip the predicted x_0 to [-1, 1].
        :param denoised_fn: optional function applied to the predicted x_0 before clipping.
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart', each [N, C, ...].
        """
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:]), "learned variances need 2C output channels"
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta~_1 at t = 0 gives the decoder a sensible variance instead of beta_1.
                variance = np.append(self.posterior_variance[1], self.betas[1:])
                log_variance = np.log(variance)
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract_into_tensor(variance, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variance, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise NotImplementedError(self.model_mean_type)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """Invert mu~_t = coef1 x_0 + coef2 x_t for x_0."""
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------------------ ancestral sampling
    # The sampling signatures are improved-diffusion's, written a few parameters to a line by hand
    # (fmt: skip), as ruff would give each of their seven to ten parameters a line.
    def p_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:  # fmt: skip
        """One ancestral step x_t -> x_{t-1}; returns {'sample', 'pred_xstart'}, each [N, C, ...].

        No noise is added at t = 0: the decoder's mean is the final sample.
        :param noise: the step's standard normal noise (default: drawn from the global RNG).
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self, model: Model, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True, denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None,
        device: Optional[torch.device] = None, progress: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """Generate samples of the given shape [N, C, H, W] from the model; returns x_0."""
        steps = self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress
        )
        return _last(steps)["sample"]

    def p_sample_loop_progressive(
        self, model: Model, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True, denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None,
        device: Optional[torch.device] = None, progress: bool = False,
    ) -> Iterator[Dict[str, torch.Tensor]]:  # fmt: skip
        """Yield p_sample's output dict at every step, from t = T-1 down to 0."""
        step_kwargs = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        return self._loop(self.p_sample, model, shape, noise, device, progress, step_kwargs)

    def _reversed_timesteps(self, progress: bool) -> Iterable[int]:
        """T-1 down to 0, with a progress bar if asked."""
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            return tqdm(indices)
        return indices

    def _loop(self, step, model, shape, noise, device, progress, step_kwargs):
        """Run step (p_sample or ddim_sample) from t = T-1 down to 0, yielding each step's output dict."""
        if device is None:
            device = next(model.parameters()).device
        img = noise if noise is not None else torch.randn(*shape, device=device)
        for i in self._reversed_timesteps(progress):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ DDIM
    def ddim_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None, eta: float = 0.0,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:  # fmt: skip
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, Eq. 12); eta = 0 is deterministic.

        :param noise: the step's standard normal noise for eta > 0 (default: drawn from the global RNG).
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        if noise is None:
            noise = torch.randn_like(x)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None, eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:  # fmt: skip
        """One deterministic DDIM step forward in time, x_t -> x_{t+1} (the ODE's inversion)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is only defined for eta = 0 (the deterministic ODE)")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self, model: Model, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True, denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None,
        device: Optional[torch.device] = None, progress: bool = False, eta: float = 0.0,
    ) -> torch.Tensor:  # fmt: skip
        """Generate samples [N, C, H, W] with DDIM; returns x_0."""
        steps = self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta
        )
        return _last(steps)["sample"]

    def ddim_sample_loop_progressive(
        self, model: Model, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True, denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None,
        device: Optional[torch.device] = None, progress: bool = False, eta: float = 0.0,
    ) -> Iterator[Dict[str, torch.Tensor]]:  # fmt: skip
        """Yield ddim_sample's output dict at every step, from t = T-1 down to 0."""
        step_kwargs = dict(
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta
        )
        return self._loop(self.ddim_sample, model, shape, noise, device, progress, step_kwargs)

    # ------------------------------------------------------------------ DPM-Solver++
    def dpm_solver_sample_loop(
        self, model: Model, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True, denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None,
        device: Optional[torch.device] = None, progress: bool = False, sde: bool = False,
        step_noise: Optional[Callable[[], torch.Tensor]] = None,
    ) -> torch.Tensor:  # fmt: skip
        """Generate samples [N, C, H, W] with DPM-Solver++(2M), one model evaluation per timestep of this
        diffusion (respace it to N steps for N evaluations); returns x_0."""
        steps = self.dpm_solver_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, sde, step_noise
        )
        return _last(steps)["sample"]

    def dpm_solver_sample_loop_progressive(
        self, model: Model, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True, denoised_fn: DenoisedFn = None, model_kwargs: ModelKwargs = None,
        device: Optional[torch.device] = None, progress: bool = False, sde: bool = False,
        step_noise: Optional[Callable[[], torch.Tensor]] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:  # fmt: skip
        """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): the probability-flow ODE solved in its
        data-prediction form, multistep, second order. Yields {'sample', 'pred_xstart'} after each model
        evaluation, at t = T-1 down to 0 of this diffusion.

        With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), the log-SNR lambda_t = log(alpha_t / sigma_t)
        and D_t the model's x_0 prediction at t (clipped with clip_denoised; learned variances, eps or x_0
        prediction and rescaled timesteps as p_mean_variance handles them), a step from s to t, h = lambda_t -
        lambda_s, is
            x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D'
        with D' = D_s on the first step (first order) and, after, D' = (1 + 1/(2r)) D_s - 1/(2r) D_{s'} where
        s' is the point before s and r = (lambda_s - lambda_{s'}) / h. The last step goes from t = 0 to noise
        level 0, where the solution is the x_0 prediction itself (first order, as DDIM's last step and
        diffusers' final_sigmas_type "zero").

        With sde, SDE-DPM-Solver++(2M) (the paper's stochastic variant, its second-order term the midpoint
        one): the reverse SDE instead of the ODE, each step
            x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D' + sigma_t sqrt(1 - e^{-2h}) z,
        D' = D_s + (D_s - D_{s'}) / (2r) after the first step, z standard normal (step_noise(), else drawn
        from the global RNG): fresh noise corrects a model's errors on the way, as ancestral sampling does.
        """
        if device is None:
            device = next(model.parameters()).device
        x = noise if noise is not None else torch.randn(*shape, device=device)
        alpha, sigma = np.sqrt(self.alphas_cumprod), np.sqrt(1.0 - self.alphas_cumprod)
        lam = np.log(alpha) - np.log(sigma)
        d_prev, h_prev = None, None
        for s in self._reversed_timesteps(progress):
            t_s = torch.full((shape[0],), s, device=x.device, dtype=torch.long)
            with torch.no_grad():
                d = self.p_mean_variance(
                    model,
                    x,
                    t_s,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    model_kwargs=model_kwargs,
                )["pred_xstart"]
            if s == 0:
                x = d
            else:
                t = s - 1  # the next (less noisy) timestep of this diffusion
                h = lam[t] - lam[s]
                if d_prev is None:
                    d_eff = d
                else:
                    r = h_prev / h
                    d_eff = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
                if sde:
                    z = step_noise() if step_noise is not None else torch.randn_like(x)
                    decay = np.exp(-h)
                    x = (sigma[t] / sigma[s]) * decay * x - alpha[t] * np.expm1(-2 * h) * d_eff
                    x = x + sigma[t] * np.sqrt(-np.expm1(-2 * h)) * z
                else:
                    x = (sigma[t] / sigma[s]) * x - alpha[t] * np.expm1(-h) * d_eff
                d_prev, h_prev = d, h
            yield {"sample": x, "pred_xstart": d}

    # ------------------------------------------------------------------ losses
    def _vb_terms_bpd(
        self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None
    ) -> Dict[str, torch.Tensor]:
        """The per-timestep VLB term in bits per dimension, [N].

        L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised decoder NLL L_0 at t = 0.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(
            normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        ) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: ModelKwargs = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample training losses for x_0 = x_start [N, C, ...] at timesteps t [N].

        :return: dict of [N] tensors: 'loss' (the objective), and for the MSE
            losses 'mse' plus, with learned variances, 'vb' (L_vlb in bits/dim,
            times T/1000 for RESCALED_MSE). In L_hybrid the vb term sees the
            mean output through a stop-gradient (paper Sec. 3.1), so it trains
            only the variance.
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise NotImplementedError(self.loss_type)
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            assert model_output.shape == (B, C * 2, *x_t.shape[2:]), (
                "learned variances need 2C output channels"
            )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # L_simple averages over T terms while L_vlb sums them: lambda = 1/1000 keeps T = 1000 the
                # paper's setting.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[
                0
            ],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        if self.mse_weights is not None:  # the vb term keeps its own weight
            terms["mse"] = terms["mse"] * _extract_into_tensor(self.mse_weights, t, t.shape)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N]; not trainable, it only depends on the schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: ModelKwargs = None,
    ) -> Dict[str, torch.Tensor]:
        """The full variational bound of x_start [N, C, ...] in bits per dimension.

        :return: dict with 'total_bpd' [N] (sum of all terms plus the prior),
            'prior_bpd' [N], and per-timestep [N, T] 'vb', 'xstart_mse', 'mse' (of eps).
        """
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps)[::-1]:
            t = torch.full((B,), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((self._predict_eps_from_xstart(x_t, t, out["pred_xstart"]) - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
