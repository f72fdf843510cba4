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


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of a base process's steps.

    Keeping steps S = {s_0 < s_1 < ...} preserves alpha_bar at each kept step;
    the new betas are 1 - alpha_bar_{s_i} / alpha_bar_{s_{i-1}}. The model still
    sees the original timestep indices (mapped, then rescaled if asked).

    :param use_timesteps: the kept step indices of the base process.
    :param kwargs: GaussianDiffusion's keywords for the base process.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
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
