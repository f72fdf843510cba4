"""Small building blocks of the UNet, and the seam through which fused kernels plug in.

The UNet calls a `GroupNorm32` for every GroupNorm(+scale-shift)(+SiLU)
chain and `qkv_attention` for attention. With `use_fused_kernels` these go to
the `kernels` package's Triton kernels (where they run; their PyTorch references
elsewhere); without, straight to those references, which compute the chain and
attention as improved-diffusion does. Parameters and their names are the
same either way, so checkpoints do not care which path ran.
"""

import math
from typing import Optional

import torch
import torch.nn as nn

import kernels


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16/bf16 statistics drift), optionally
    followed by a scale-shift and SiLU in the same call."""

    use_fused_kernels = False

    def forward(
        self,
        x: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
        shift: Optional[torch.Tensor] = None,
        silu: bool = False,
    ) -> torch.Tensor:
        """groupnorm(x) * (1 + scale) + shift, then SiLU if silu, for x [N, C, ...] and scale/shift [N, C]
        (each optional). Called as the module (not a method) so that hooks on it run: ZeRO-3 gathers the
        weight and bias in its pre-forward hook, which a compiled UNet relies on."""
        norm_act = kernels.group_norm_silu if self.use_fused_kernels else kernels.group_norm_silu_reference
        return norm_act(
            x, self.weight, self.bias, self.num_groups, self.eps, scale=scale, shift=shift, silu=silu
        )


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: 32 groups, affine."""
    return GroupNorm32(32, channels)


def qkv_attention(qkv: torch.Tensor, num_heads: int, use_fused_kernels: bool = False) -> torch.Tensor:
    """Multi-head self-attention from a fused qkv projection.

    :param qkv: [B, 3 * heads * ch, T], laid out per head as (q, k, v) blocks
        of ch channels (improved-diffusion's "legacy" order: reshape to heads, then split).
    :return: [B, heads * ch, T] = softmax(q^T k / sqrt(ch)) applied to v, per head.
    """
    attention = kernels.qkv_attention if use_fused_kernels else kernels.qkv_attention_reference
    return attention(qkv, num_heads, order="legacy")


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
