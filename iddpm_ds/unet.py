"""The IDDPM UNet (Nichol & Dhariwal 2021, App. A) and its super-resolution variant.

Module and parameter names match improved-diffusion's unet.py, so its
state_dicts load here unchanged (see iddpm_ds.checkpoint).
"""

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .nn import (
    GroupNorm32,
    avg_pool_nd,
    conv_nd,
    normalization,
    qkv_attention,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two dims for 3-D), then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels, self.use_conv, self.dims = channels, use_conv, dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv, or average pooling without use_conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels, self.use_conv, self.dims = channels, use_conv, dims
        stride = 2 if dims != 3 else (1, 2, 2)
        self.op = (
            conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
            if use_conv
            else avg_pool_nd(dims, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    With use_scale_shift_norm the embedding modulates the second GroupNorm as
    norm(h) * (1 + scale) + shift (the paper's adaptive group norm); otherwise
    it is added to h before that norm.

    :param channels: input channels; out_channels: output channels (default: same).
    :param use_conv: a 3x3 (not 1x1) conv on the skip path when channels change.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: [N, C, ...]; emb: [N, emb_channels] -> [N, out_channels, ...]."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, in_conv = self.in_layers[0], self.in_layers[2]
        h = in_conv(in_norm(x, silu=True))
        emb_out = self.emb_layers(emb).type(h.dtype)
        out_norm, dropout, out_conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h, scale=scale, shift=shift, silu=True)
        else:
            h = out_norm(h + emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2))), silu=True)
        return self.skip_connection(x) + out_conv(dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    :param num_heads: number of heads; num_head_channels (if not -1) instead
        fixes the channels per head and derives the head count.
    """

    def __init__(
        self, channels: int, num_heads: int = 1, use_checkpoint: bool = False, num_head_channels: int = -1
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention channels {channels} are not divisible by "
                    f"num_head_channels={num_head_channels}"
                )
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.use_fused_kernels = False
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.proj_out(qkv_attention(qkv, self.num_heads, self.use_fused_kernels))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The full UNet with timestep embedding, residual blocks and attention.

    :param in_channels, out_channels: image channels in and out (out doubles for learned sigmas).
    :param model_channels: base channel count; level i has channel_mult[i] times that.
    :param num_res_blocks: residual blocks per level.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) with attention.
    :param dropout: dropout in every ResBlock.
    :param conv_resample: learned 3x3 convs for up/downsampling.
    :param dims: 1, 2 or 3 signal dimensions.
    :param num_classes: class-conditional with this many classes (labels y [N]).
    :param use_checkpoint: recompute activations in backward to save memory.
    :param num_heads, num_heads_upsample, num_head_channels: attention heads (upsample defaults to num_heads).
    :param use_scale_shift_norm: adaptive group norm in ResBlocks.
    :param use_fused_kernels: route norms and attention through the `kernels` package.
    :param channels_last: convert the activations to channels-last (NHWC) memory order once, at the input;
        convolutions, norms and the kernels then read them in place. 2-D only.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        num_head_channels: int = -1,
        use_fused_kernels: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        if channels_last and dims != 2:
            raise ValueError(f"channels_last needs 2-D images, not dims={dims}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.channels_last = channels_last

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch_in, ch_out=None):
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
            )

        def attention(ch, heads):
            return AttentionBlock(
                ch, num_heads=heads, use_checkpoint=use_checkpoint, num_head_channels=num_head_channels
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch), attention(ch, num_heads), res_block(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        self.set_fused_kernels(use_fused_kernels)

    def set_fused_kernels(self, enabled: bool) -> None:
        """Route every GroupNorm chain and attention through `kernels` (True) or plain PyTorch (False)."""
        self.use_fused_kernels = enabled
        for m in self.modules():
            if isinstance(m, (GroupNorm32, AttentionBlock)):
                m.use_fused_kernels = enabled

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x: [N, C, ...]; timesteps: [N] (int or float); y: [N] labels if class-conditional.

        Runs in the dtype of the model's parameters and returns x's dtype, so
        a bf16/fp16 model can be fed and read in float32.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass labels y if and only if the model is class-conditional (class_cond)")
        inner_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(inner_dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x.type(inner_dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        out_norm, out_conv = self.out[0], self.out[2]
        return out_conv(out_norm(h, silu=True)).type(x.dtype).contiguous()


class SuperResModel(UNetModel):
    """A UNet that also sees a low-resolution image, bilinearly upsampled and concatenated to x.

    in_channels is the channel count of x alone; the model takes twice that.
    """

    def __init__(self, in_channels: int, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, low_res: Optional[torch.Tensor] = None, **kwargs
    ) -> torch.Tensor:
        """x: [N, C, H, W]; low_res: [N, C, h, w] with h, w <= H, W."""
        if low_res is None:
            raise ValueError("SuperResModel needs the low-resolution image as low_res=")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled.type(x.dtype)], dim=1), timesteps, **kwargs)
