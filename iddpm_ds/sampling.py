"""Drawing images from a trained model, reproducibly per image, and laying them out in a grid: the three
samplers (improved-diffusion's ancestral and DDIM, DPM-Solver++(2M)), classifier-free guidance, in a limited
noise interval if asked."""

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .respace import SpacedDiffusion, log_snr_timesteps
from .seeding import mix_seed

SAMPLERS = ("ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
PRECISIONS = ("fp32", "bf16", "auto")


def fast_model(model: torch.nn.Module, precision: str = "fp32", compile: bool = False) -> Callable:
    """The model as sampling calls it: under bf16 autocast with precision "bf16", or "auto" where the device
    computes bf16 natively (dist_util.native_bf16, the training JSON's "auto" rule; elsewhere bf16 would be
    emulated and slower than fp32), outputs back in fp32 for the sampler's arithmetic; through
    torch.compile with compile (the first call of each batch shape compiles, seconds to a minute: worth it
    for long runs).
    """
    from .dist_util import native_bf16

    net = torch.compile(model) if compile else model
    if precision == "fp32" or (precision == "auto" and not native_bf16()):
        return net

    def bf16(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return net(x, t, **kwargs).float()

    return bf16


def noise_level(diffusion: SpacedDiffusion) -> Callable[[torch.Tensor], torch.Tensor]:
    """t as the model sees it (a base-process step, scaled to [0, 1000) with rescale_timesteps) -> the noise
    level sigma = sqrt((1 - abar_t) / abar_t) [N], the parametrisation of Kynkaanniemi et al. 2024 (EDM's)."""
    abar = diffusion.base_alphas_cumprod()
    sigmas = torch.from_numpy(np.sqrt((1.0 - abar) / abar))
    scale = diffusion.original_num_steps / 1000.0 if diffusion.rescale_timesteps else 1.0

    def sigma(t: torch.Tensor) -> torch.Tensor:
        steps = (t.double() * scale).round().long() if diffusion.rescale_timesteps else t.long()
        return sigmas.to(t.device)[steps]

    return sigma


def classifier_free_guidance(
    model: Callable, scale: float, null_label: int, channels: int = 3,
    interval: Optional[Tuple[float, float]] = None, sigma: Optional[Callable] = None,
) -> Callable:  # fmt: skip
    """model(x, t, y=...) with classifier-free guidance (Ho & Salimans 2022): one batched forward of the
    conditional and the null-class halves, eps_uncond + scale (eps_cond - eps_uncond) on the first
    `channels` outputs; learned-variance channels (if any) come from the conditional half. scale = 1
    is plain conditional sampling, 0 unconditional.

    :param interval: (lo, hi): guide only where lo < sigma(t) <= hi (Kynkaanniemi et al. 2024: guidance
        harms at high noise and is unneeded at low noise); elsewhere the conditional prediction alone, one
        forward of the batch. None guides at every step.
    :param sigma: t as the model sees it -> noise level (noise_level(diffusion)), with interval.
    """

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        inside = None
        if interval is not None:
            level = sigma(t)
            inside = (level > interval[0]) & (level <= interval[1])
            if not inside.any():
                return model(x, t, y=y, **kwargs)
        null = torch.full_like(y, null_label)
        both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **kwargs)
        cond, uncond = both.chunk(2)
        eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
        out = torch.cat([eps, cond[:, channels:]], dim=1)
        if inside is not None and not inside.all():  # a batch of mixed timesteps: guide only its insiders
            out = torch.where(inside.view(-1, *[1] * (x.dim() - 1)), out, cond)
        return out

    return guided


def diffusion_for_sampler(diffusion: SpacedDiffusion, sampler: str) -> SpacedDiffusion:
    """The steps a sampler takes: as respaced for ancestral and DDIM; for dpmpp_2m the same number of model
    evaluations at log-SNR-uniform steps of the base process (respace.log_snr_timesteps)."""
    if not sampler.startswith("dpmpp"):
        return diffusion
    return diffusion.respaced(log_snr_timesteps(diffusion.base_alphas_cumprod(), diffusion.num_timesteps))


def describe_sampler(
    diffusion: SpacedDiffusion, sampler: str, respacing: str, eta: float = 0.0, guidance_scale: float = 1.0,
    interval: Optional[Tuple[float, float]] = None,
) -> str:  # fmt: skip
    """One line on what sampling will do, e.g. "ancestral, 50 of the 1000 diffusion steps (respacing 'ddim50'
    only picks which; --sampler ddim samples them with DDIM)"."""
    n, total = diffusion.num_timesteps, diffusion.original_num_steps
    if sampler.startswith("dpmpp"):
        name = "SDE-DPM-Solver++(2M)" if sampler == "dpmpp_2m_sde" else "DPM-Solver++(2M)"
        text = f"{name}, {n} model evaluations at log-SNR-uniform steps of the {total}"
    elif sampler == "ddim":
        text = f"DDIM (eta {eta:g}), {n} of the {total} diffusion steps"
    else:
        text = f"ancestral, {n} of the {total} diffusion steps"
        if respacing.startswith("ddim"):
            text += f" (respacing '{respacing}' only picks which; --sampler ddim samples them with DDIM)"
    if guidance_scale != 1.0:
        text += f", classifier-free guidance {guidance_scale:g}"
        text += f" where {interval[0]:g} < sigma <= {interval[1]:g}" if interval else " at every step"
    return text


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    diffusion: SpacedDiffusion,
    indices: Sequence[int],
    image_size: int,
    seed: int,
    model_kwargs: Optional[Dict] = None,
    sampler: str = "ancestral",
    eta: float = 0.0,
    clip_denoised: bool = True,
    device: Optional[torch.device] = None,
    on_step: Optional[Callable[[], None]] = None,
) -> np.ndarray:
    """Sample the images with these indices; returns uint8 [N, H, W, 3].

    :param diffusion: the respaced process; sampler: one of SAMPLERS (dpmpp_2m takes the respacing's count
        as its number of model evaluations, diffusion_for_sampler).
    :param on_step: called after each denoising step (a progress bar's update).

    Image i draws x_T and every step's noise from its own generator seeded by
    (seed, i), so an image does not depend on the batch it is in or on the
    number of ranks.
    """
    device = device or next(model.parameters()).device
    diffusion = diffusion_for_sampler(diffusion, sampler)
    shape = (3, image_size, image_size)
    gens = [torch.Generator().manual_seed(mix_seed(seed, i)) for i in indices]

    def noise():
        return torch.stack([torch.randn(*shape, generator=g) for g in gens]).to(device)

    x = noise()
    if sampler.startswith("dpmpp"):
        steps = diffusion.dpm_solver_sample_loop_progressive(
            model, x.shape, noise=x, clip_denoised=clip_denoised, model_kwargs=model_kwargs, device=device,
            sde=sampler == "dpmpp_2m_sde", step_noise=noise,
        )  # fmt: skip
        for out in steps:
            x = out["sample"]
            if on_step is not None:
                on_step()
    else:
        step = diffusion.ddim_sample if sampler == "ddim" else diffusion.p_sample
        extra = {"eta": eta} if sampler == "ddim" else {}
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((len(indices),), i, device=device, dtype=torch.long)
            out = step(
                model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, noise=noise(), **extra
            )
            x = out["sample"]
            if on_step is not None:
                on_step()
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] image on white, as square as N
    allows."""
    n, h, w, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    return grid
