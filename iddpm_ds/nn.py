"""Small building blocks of the UNet, and the seam through which fused kernels plug in.

The UNet calls `GroupNorm32.norm_act` for every GroupNorm(+scale-shift)(+SiLU)
chain and `qkv_attention` for attention. With `use_fused_kernels` these go to
the `kernels` package (Triton where it runs, its PyTorch reference elsewhere);
without, to the plain PyTorch ops below. Parameters and their names are the
same either way, so checkpoints do not care which path ran.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16/bf16 statistics drift)."""

    use_fused_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_act(x, silu=False)

    def norm_act(
        self,
        x: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
        shift: Optional[torch.Tensor] = None,
        silu: bool = True,
    ) -> torch.Tensor:
        """silu(groupnorm(x) * (1 + scale) + shift) for x [N, C, ...] and scale/shift [N, C] (each
        optional)."""
        if self.use_fused_kernels:
            import kernels

            return kernels.group_norm_silu(
                x, self.weight, self.bias, self.num_groups, self.eps, scale=scale, shift=shift, silu=silu
            )
        return unfused_norm_act(
            x, self.weight, self.bias, self.num_groups, self.eps, scale=scale, shift=shift, silu=silu
        )


def unfused_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    silu: bool = True,
) -> torch.Tensor:
    """The chain in plain PyTorch ops, as improved-diffusion computes it: GroupNorm in float32, cast back to
    x's
    dtype, then scale-shift and SiLU in x's dtype. x [N, C, ...], weight/bias [C], scale/shift [N, C]."""
    # Parameters may be bf16/fp16 under DeepSpeed: upcast them with x.
    h = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps).type(x.dtype)
    if scale is not None or shift is not None:
        bshape = (h.shape[0], h.shape[1]) + (1,) * (h.dim() - 2)
        if scale is not None:
            h = h * (1 + scale.reshape(bshape))
        if shift is not None:
            h = h + shift.reshape(bshape)
    return F.silu(h) if silu else h


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: 32 groups, affine."""
    return GroupNorm32(32, channels)


def qkv_attention(qkv: torch.Tensor, num_heads: int, use_fused_kernels: bool = False) -> torch.Tensor:
    """Multi-head self-attention from a fused qkv projection.

    :param qkv: [B, 3 * heads * ch, T], laid out per head as (q, k, v) blocks
        of ch channels (improved-diffusion's "legacy" order: reshape to heads, then split).
    :return: [B, heads * ch, T] = softmax(q^T k / sqrt(ch)) applied to v, per head.
    """
    if use_fused_kernels:
        import kernels

        return kernels.qkv_attention(qkv, num_heads, order="legacy")
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(bs * num_heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))  # scaling q and k separately keeps fp16 logits in range
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch starts as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embeddings [N, dim] of (possibly fractional) timesteps [N], float32.

    The first half are cosines, the second sines, of t * max_period^(-i / half).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
