"""GroupNorm, optionally followed by a per-(batch, channel) scale-shift and SiLU, in one pass.

y = silu(((x - mean_g) * rstd_g * weight + bias) * (1 + scale) + shift), with the
group statistics in float32 whatever x's dtype (the Triton kernel keeps the whole chain in float32 and
rounds once).

The Triton kernels are wrapped as the custom op `iddpm_kernels::group_norm_silu` (with its backward op,
autograd and fake implementation), so torch.compile traces a UNet that calls them without a graph break
and places the kernels inside its graph.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import self_check
from .dispatch import reference_vjp, run_triton_or_reference, use_triton


# The op and its reference share a signature, written two lines long by hand (fmt: skip: ruff would give
# each of the eight parameters a line).
def group_norm_silu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None, silu: bool = True,
) -> torch.Tensor:  # fmt: skip
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


def rows_view(x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """x [B, C, *spatial] as the kernels read it: a [B, C, L] view and its (channel, position) strides.

    Contiguous and channels-last tensors are read in place (a channels_last UNet pays no conversion);
    any other layout is copied to contiguous once.
    """
    B, C = x.shape[:2]
    L = x.numel() // max(B * C, 1)
    if x.dim() > 2 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, *range(2, x.dim()), 1).reshape(B, L, C).transpose(1, 2), (1, C)
    flattened_channels_last = x.dim() == 3 and x.stride() == (C * L, 1, C) and not x.is_contiguous()
    if flattened_channels_last:
        return x, (1, C)
    return x.contiguous().view(B, C, L), (L, 1)


def _empty_stats(x: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0] * num_groups
    return x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def _triton_forward(x, weight, bias, scale, shift, num_groups, eps, silu):
    """(y, mean, rstd) from the Triton launches; y in the layout rows_view(x) reads x."""
    from . import group_norm_triton

    x3, strides = rows_view(x)
    y3, mean, rstd = group_norm_triton.forward(x3, strides, weight, bias, scale, shift, num_groups, eps, silu)
    return y3.view(x.shape), mean, rstd


def _triton_backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
    """(dx, dweight, dbias, dscale, dshift) from the Triton launches."""
    from . import group_norm_triton

    x3, strides = rows_view(x)
    dy3, dy_strides = rows_view(dy)
    if dy_strides != strides:  # the kernels read dy in x's layout
        dy3 = torch.empty_like(x3)
        dy3.view(x.shape).copy_(dy)
    dx3, *grads = group_norm_triton.backward(
        dy3, x3, strides, weight, bias, scale, shift, mean, rstd, num_groups, silu
    )
    return (dx3.view(x.shape), *grads)


def _shape_class(x, weight, scale, shift, num_groups, silu) -> tuple:
    """The self-check's key: what the Triton launches for this input compile for."""
    from . import group_norm_triton

    x3, strides = rows_view(x)
    return (
        "group_norm_silu",
        *group_norm_triton.shape_class(x3, strides, weight, scale, shift, num_groups, silu),
    )


def _differentiable_reference(has_scale: bool, has_shift: bool, num_groups: int, eps: float, silu: bool):
    """The reference as a function of its tensors alone, (x, weight, bias[, scale][, shift]) -> y, for
    reference_vjp."""

    def reference(x, weight, bias, *modulation):
        scale = modulation[0] if has_scale else None
        shift = modulation[-1] if has_shift else None
        return group_norm_silu_reference(
            x, weight, bias, num_groups, eps, scale=scale, shift=shift, silu=silu
        )

    return reference


def _self_check(x, weight, bias, scale, shift, num_groups, eps, silu) -> bool:
    """The kernels' forward and backward on this input against the reference (kernels.self_check)."""
    inputs = [t for t in (x, weight, bias, scale, shift) if t is not None]

    def kernel(dy):
        y, mean, rstd = _triton_forward(x, weight, bias, scale, shift, num_groups, eps, silu)
        dx, dweight, dbias, dscale, dshift = _triton_backward(
            dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu
        )
        modulation = [g for g, t in ((dscale, scale), (dshift, shift)) if t is not None]
        return y, [dx, dweight, dbias, *modulation]

    reference = _differentiable_reference(scale is not None, shift is not None, num_groups, eps, silu)
    layout = ", channels-last" if rows_view(x)[1][1] != 1 else ""
    where = f"{x.device} {x.dtype} {list(x.shape)} ({num_groups} groups{layout})"
    tolerance = self_check.TOLERANCES[x.dtype]
    return self_check.check("group_norm_silu", where, inputs, x.shape, kernel, reference, tolerance)


def _in_layout_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t (x's shape) copied into the layout the kernels give x's outputs."""
    out = torch.empty_like(rows_view(x)[0])
    out.view(x.shape).copy_(t)
    return out.view(x.shape)


@torch.library.custom_op("iddpm_kernels::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    silu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): the Triton forward, y laid out as rows_view(x) reads x; the float32 group
    statistics [B * num_groups] feed the backward. The first input of each shape class is self-checked.
    Where Triton cannot build the kernel or its shape class failed the check, the reference computes y
    (the statistics are then unused: the backward falls back too)."""

    def reference_forward():
        y = group_norm_silu_reference(x, weight, bias, num_groups, eps, scale=scale, shift=shift, silu=silu)
        return (_in_layout_of(x, y), *_empty_stats(x, num_groups))

    return run_triton_or_reference(
        "group_norm_silu",
        lambda: _triton_forward(x, weight, bias, scale, shift, num_groups, eps, silu),
        reference_forward,
        _shape_class(x, weight, scale, shift, num_groups, silu),
        lambda: _self_check(x, weight, bias, scale, shift, num_groups, eps, silu),
    )


@_group_norm_silu_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, silu):
    x3, _ = rows_view(x)
    return (torch.empty_like(x3).view(x.shape), *_empty_stats(x, num_groups))


@torch.library.custom_op("iddpm_kernels::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dscale, dshift) of the forward op; dscale / dshift are empty where scale /
    shift are None. Where the forward fell back, autograd through the reference."""

    def reference_backward():
        inputs = [t for t in (x, weight, bias, scale, shift) if t is not None]
        reference = _differentiable_reference(scale is not None, shift is not None, num_groups, eps, silu)
        grads = list(reference_vjp(reference, inputs, dy)[1])
        dx, dweight, dbias = grads[:3]
        dscale = grads[3] if scale is not None else x.new_empty(0)
        dshift = grads[-1] if shift is not None else x.new_empty(0)
        return _in_layout_of(x, dx), dweight, dbias, dscale, dshift

    return run_triton_or_reference(
        "group_norm_silu",
        lambda: _triton_backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu),
        reference_backward,
        _shape_class(x, weight, scale, shift, num_groups, silu),
    )


@_group_norm_silu_backward_op.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, silu):
    x3, _ = rows_view(x)
    return (
        torch.empty_like(x3).view(x.shape),
        torch.empty_like(weight),
        torch.empty_like(bias),
        torch.empty_like(scale) if scale is not None else x.new_empty(0),
        torch.empty_like(shift) if shift is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.args = (num_groups, eps, silu)
    ctx.has = (scale is not None, shift is not None)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dscale, dshift = _group_norm_silu_backward_op(
        dy, x, weight, bias, scale, shift, mean, rstd, *ctx.args
    )
    has_scale, has_shift = ctx.has
    return dx, dweight, dbias, dscale if has_scale else None, dshift if has_shift else None, None, None, None


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None, silu: bool = True,
) -> torch.Tensor:  # fmt: skip
    """silu(group_norm(x) * (1 + scale) + shift); see group_norm_silu_reference for shapes.

    Differentiable in x, weight, bias, scale and shift. The output keeps x's layout where the kernel
    reads it in place (contiguous or channels-last).
    """
    if x.shape[1] % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {x.shape[1]} channels")
    if use_triton(x):
        return _group_norm_silu_op(x, weight, bias, scale, shift, num_groups, eps, silu)[0]
    return group_norm_silu_reference(x, weight, bias, num_groups, eps, scale=scale, shift=shift, silu=silu)
