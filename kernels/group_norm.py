"""GroupNorm, optionally followed by a per-(batch, channel) scale-shift and SiLU, in one pass.

y = silu(((x - mean_g) * rstd_g * weight + bias) * (1 + scale) + shift), with the
group statistics in float32 whatever x's dtype (the Triton kernel keeps the whole chain in float32 and
rounds once).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import run_triton_or_reference, use_triton


def group_norm_silu_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    silu: bool = True,
) -> torch.Tensor:
    """PyTorch reference: x [B, C, *spatial], weight/bias [C], scale/shift [B, C] -> x's shape and dtype.

    The unfused chain as improved-diffusion computes it (the UNet runs it whenever the kernels are off):
    GroupNorm in float32 (float64 for float64 inputs, the tests' exact reference), cast back to x's dtype,
    then scale-shift and SiLU in x's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.group_norm(x.to(acc), num_groups, weight.to(acc), bias.to(acc), eps).to(x.dtype)
    bshape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.reshape(bshape))
    if shift is not None:
        h = h + shift.reshape(bshape)
    return F.silu(h) if silu else h


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    silu: bool = True,
) -> torch.Tensor:
    """silu(group_norm(x) * (1 + scale) + shift); see group_norm_silu_reference for shapes.

    Differentiable in x, weight, bias, scale and shift.
    """
    if x.shape[1] % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {x.shape[1]} channels")

    def reference():
        return group_norm_silu_reference(
            x, weight, bias, num_groups, eps, scale=scale, shift=shift, silu=silu
        )

    if use_triton(x):
        from .group_norm_triton import GroupNormSiLU

        return run_triton_or_reference(
            "group_norm_silu",
            lambda: GroupNormSiLU.apply(x, weight, bias, scale, shift, num_groups, eps, silu),
            reference,
        )
    return reference()
