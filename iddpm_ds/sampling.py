"""Drawing images from a trained model, reproducibly per image, and laying them out in a grid."""

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion
from .seeding import mix_seed


def classifier_free_guidance(model: Callable, scale: float, null_label: int, channels: int = 3) -> Callable:
    """model(x, t, y=...) with classifier-free guidance (Ho & Salimans 2022): one batched forward of the
    conditional and the null-class halves, eps_uncond + scale (eps_cond - eps_uncond) on the first
    `channels` outputs; learned-variance channels (if any) come from the conditional half. scale = 1
    is plain conditional sampling, 0 unconditional."""

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        null = torch.full_like(y, null_label)
        both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **kwargs)
        cond, uncond = both.chunk(2)
        eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    indices: Sequence[int],
    image_size: int,
    seed: int,
    model_kwargs: Optional[Dict] = None,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    device: Optional[torch.device] = None,
    on_step: Optional[Callable[[], None]] = None,
) -> np.ndarray:
    """Sample the images with these indices; returns uint8 [N, H, W, 3].

    on_step, if given, is called after each denoising step (a progress bar's update).

    Image i draws x_T and every step's noise from its own generator seeded by
    (seed, i), so an image does not depend on the batch it is in or on the
    number of ranks.
    """
    device = device or next(model.parameters()).device
    shape = (3, image_size, image_size)
    gens = [torch.Generator().manual_seed(mix_seed(seed, i)) for i in indices]

    def noise():
        return torch.stack([torch.randn(*shape, generator=g) for g in gens]).to(device)

    x = noise()
    step = diffusion.ddim_sample if use_ddim else diffusion.p_sample
    extra = {"eta": eta} if use_ddim else {}
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((len(indices),), i, device=device, dtype=torch.long)
        x = step(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, noise=noise(), **extra)[
            "sample"
        ]
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
