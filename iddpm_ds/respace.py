"""Timestep respacing: run a trained T-step diffusion with a subset of its steps (paper Sec. 4)."""

from typing import Dict, Iterable, List, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, section_counts: Union[str, List[int]]) -> Set[int]:
    """Choose which of the original num_timesteps steps to keep.

    :param section_counts: a list (or comma-separated string) of counts: the
        process is cut into len(section_counts) equal sections and each keeps
        that many evenly strided steps, so "10,15,20" keeps 10 steps of the
        first third, 15 of the second, 20 of the last. "ddimN" instead picks
        the integer stride that keeps exactly N steps, as the DDIM paper does.
    :return: the set of kept step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired_count} steps with an integer stride over {num_timesteps}"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # A running sum, not frac_stride * j: the two round differently where a partial sum lands
        # near .5, and improved-diffusion's checkpoints were sampled with the running sum.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


# DPM-Solver++'s steps start no noisier than this log-SNR (diffusers' lambda_min_clipped, recommended there
# for the cosine schedule, whose last steps reach log-SNR -10: uniform steps would crowd where little
# changes). The linear schedule's T = 1000 ends at -5.06, so it is untouched.
LOG_SNR_MIN = -5.1


def log_snr_timesteps(alphas_cumprod: np.ndarray, n: int, log_snr_min: float = LOG_SNR_MIN) -> List[int]:
    """n distinct steps of a T-step process for a few-step ODE solver, from T-1 down to 0: in between, the
    steps nearest to log-SNR values spaced uniformly from max(log-SNR(T-1), log_snr_min) to log-SNR(0).

    Evenly strided steps (space_timesteps) leave the low-noise end, where an ODE solver's log-SNR steps are
    longest, nearly unsampled: on Gaussian data with T = 1000 (where the exact solution is known),
    DPM-Solver++ at 10 steps errs about 10x less at these steps than at evenly strided ones, either schedule.
    """
    T = len(alphas_cumprod)
    if not 2 <= n <= T:
        raise ValueError(f"cannot choose {n} steps of {T} from T-1 down to 0 (need 2 to {T})")
    log_snr = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # rises as t falls
    targets = np.linspace(max(log_snr[-1], log_snr_min), log_snr[0], n)
    steps = [T - 1]
    for k in range(1, n - 1):
        candidates = np.arange(n - 1 - k, steps[-1])  # below the last step, leaving room for the rest
        steps.append(int(candidates[np.argmin(np.abs(log_snr[candidates] - targets[k]))]))
    return steps + [0]


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of a base process's steps.

    Keeping steps S = {s_0 < s_1 < ...} preserves alpha_bar at each kept step;
    the new betas are 1 - alpha_bar_{s_i} / alpha_bar_{s_{i-1}}. The model still
    sees the original timestep indices (mapped, then rescaled if asked).

    :param use_timesteps: the kept step indices of the base process.
    :param kwargs: GaussianDiffusion's keywords for the base process.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.base_kwargs = dict(kwargs)  # the base process, for respaced()
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base_diffusion = GaussianDiffusion(**kwargs)
        kept = np.array(
            sorted(i for i in self.use_timesteps if 0 <= i < self.original_num_steps), dtype=np.int64
        )
        if len(kept) != len(self.use_timesteps) or len(kept) == 0:
            raise ValueError(f"use_timesteps must be a non-empty subset of range({self.original_num_steps})")
        self.timestep_map = kept.tolist()
        kept_abar = base_diffusion.alphas_cumprod[kept]
        kwargs["betas"] = 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
        super().__init__(**kwargs)

    def respaced(self, use_timesteps: Iterable[int]) -> "SpacedDiffusion":
        """The same base process over other kept steps (indices of the base process)."""
        return SpacedDiffusion(use_timesteps, **self.base_kwargs)

    def base_alphas_cumprod(self) -> np.ndarray:
        """alpha_bar of every step of the base process [original_num_steps]."""
        return np.cumprod(1.0 - np.asarray(self.base_kwargs["betas"], dtype=np.float64))

    def p_mean_variance(self, model: Model, *args, **kwargs) -> Dict[str, torch.Tensor]:
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: Model, *args, **kwargs) -> Dict[str, torch.Tensor]:
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # _WrappedModel maps and rescales; doing it here too would do it twice.
        return t


class _WrappedModel:
    """Calls the model with original-process timesteps instead of respaced indices."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)

    def parameters(self):
        return self.model.parameters()
