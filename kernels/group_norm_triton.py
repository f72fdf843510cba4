"""Triton GroupNorm(+scale-shift)(+SiLU): forward and backward, next to its autograd.Function.

Layout: x is contiguous [B, C, L] (L = H*W, any size); a row is one (b, c)
pair's L elements. Forward = a statistics pass (sum and sum of squares per
(b, group), fp32) and an apply pass; backward = a pass that reduces two sums
per row and a pass that writes dx. Every pass reads x once, so fwd+bwd moves
about 2 reads + 1 write forward and 4 reads + 1 write backward. Per-channel
and per-group reductions of the row sums are tiny and done in PyTorch.

    xhat = (x - mean_g) * rstd_g          z = xhat * w + b
    u = z * (1 + scale) + shift           y = silu(u)  (or u)
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(X, Mean, Rstd, group_numel, eps, BLOCK: tl.constexpr):
    """One program per (b, group): the group's elements are contiguous in [B, C, L]."""
    pid = tl.program_id(0)
    base = X + pid.to(tl.int64) * group_numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    # Shift by the first element: sum((x - x0)^2) does not cancel catastrophically when |mean| >> std.
    shift = tl.load(base).to(tl.float32)
    for start in range(0, group_numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_numel
        v = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        acc += v
        acc_sq += v * v
    mean_shifted = tl.sum(acc, axis=0) / group_numel
    var = tl.maximum(tl.sum(acc_sq, axis=0) / group_numel - mean_shifted * mean_shifted, 0.0)
    tl.store(Mean + pid, mean_shifted + shift)
    tl.store(Rstd + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _row_params(W, Bias, Scale, Shift, Mean, Rstd, row, C, channels_per_group, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """For row = b*C + c: the group's mean/rstd and the channel's affine (w, b) and modulation (1 + scale, shift)."""
    b = row // C
    c = row % C
    g = b * (C // channels_per_group) + c // channels_per_group
    mean = tl.load(Mean + g)
    rstd = tl.load(Rstd + g)
    w = tl.load(W + c).to(tl.float32)
    bias = tl.load(Bias + c).to(tl.float32)
    mult = 1.0
    if HAS_SCALE:
        mult = 1.0 + tl.load(Scale + row).to(tl.float32)
    add = 0.0
    if HAS_SHIFT:
        add = tl.load(Shift + row).to(tl.float32)
    return g, mean, rstd, w, bias, mult, add


@triton.jit
def _apply_kernel(X, Y, W, Bias, Scale, Shift, Mean, Rstd, C, L, channels_per_group,
                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (B*C, cdiv(L, BLOCK)): one block of one row."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    g, mean, rstd, w, bias, mult, add = _row_params(W, Bias, Scale, Shift, Mean, Rstd, row, C, channels_per_group, HAS_SCALE, HAS_SHIFT)
    ptr = row.to(tl.int64) * L + offs
    x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
    u = ((x - mean) * rstd * w + bias) * mult + add
    if SILU:
        u = u * tl.sigmoid(u)
    tl.store(Y + ptr, u.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_row_sums_kernel(X, DY, W, Bias, Scale, Shift, Mean, Rstd, A1, A2, C, L, channels_per_group,
                         HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: A1 = sum(du), A2 = sum(du * xhat), where du = dL/du."""
    row = tl.program_id(0)
    g, mean, rstd, w, bias, mult, add = _row_params(W, Bias, Scale, Shift, Mean, Rstd, row, C, channels_per_group, HAS_SCALE, HAS_SHIFT)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    base = row.to(tl.int64) * L
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < L
        xhat = (tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        du = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            u = (xhat * w + bias) * mult + add
            sig = tl.sigmoid(u)
            du = du * sig * (1.0 + u * (1.0 - sig))
        du = tl.where(mask, du, 0.0)
        acc1 += du
        acc2 += du * xhat
    tl.store(A1 + row, tl.sum(acc1, axis=0))
    tl.store(A2 + row, tl.sum(acc2, axis=0))


@triton.jit
def _bwd_dx_kernel(X, DY, DX, W, Bias, Scale, Shift, Mean, Rstd, K1, K2, C, L, channels_per_group,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """dx = rstd * (du * w * (1 + scale) - k1_g - xhat * k2_g), with k1/k2 the group means of dxhat and dxhat * xhat."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    g, mean, rstd, w, bias, mult, add = _row_params(W, Bias, Scale, Shift, Mean, Rstd, row, C, channels_per_group, HAS_SCALE, HAS_SHIFT)
    k1 = tl.load(K1 + g)
    k2 = tl.load(K2 + g)
    ptr = row.to(tl.int64) * L + offs
    xhat = (tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    du = tl.load(DY + ptr, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        u = (xhat * w + bias) * mult + add
        sig = tl.sigmoid(u)
        du = du * sig * (1.0 + u * (1.0 - sig))
    dx = rstd * (du * w * mult - k1 - xhat * k2)
    tl.store(DX + ptr, dx.to(DX.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return max(16, min(4096, triton.next_power_of_2(n)))


class GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x) * (1 + scale) + shift) with Triton kernels; see kernels.group_norm.group_norm_silu."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, silu):
        B, C = x.shape[:2]
        x3 = x.contiguous().view(B, C, -1)
        L = x3.shape[2]
        cpg = C // num_groups
        mean = torch.empty(B * num_groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _stats_kernel[(B * num_groups,)](x3, mean, rstd, cpg * L, eps, BLOCK=_block(cpg * L))
        scale_c = scale.contiguous().view(B * C) if scale is not None else mean
        shift_c = shift.contiguous().view(B * C) if shift is not None else mean
        y = torch.empty_like(x3)
        block = _block(L)
        _apply_kernel[(B * C, triton.cdiv(L, block))](x3, y, weight, bias, scale_c, shift_c, mean, rstd, C, L, cpg,
                                                     HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu, BLOCK=block)
        ctx.save_for_backward(x3, weight, bias, scale, shift, mean, rstd)
        ctx.meta = (num_groups, silu, x.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x3, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        num_groups, silu, shape = ctx.meta
        B, C, L = x3.shape
        cpg = C // num_groups
        dy3 = dy.contiguous().view(B, C, L)
        scale_c = scale.contiguous().view(B * C) if scale is not None else mean
        shift_c = shift.contiguous().view(B * C) if shift is not None else mean
        a1 = torch.empty(B * C, device=x3.device, dtype=torch.float32)
        a2 = torch.empty_like(a1)
        flags = dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu)
        _bwd_row_sums_kernel[(B * C,)](x3, dy3, weight, bias, scale_c, shift_c, mean, rstd, a1, a2, C, L, cpg, BLOCK=_block(L), **flags)
        a1, a2 = a1.view(B, C), a2.view(B, C)
        mult = 1 + scale.float() if scale is not None else torch.ones_like(a1)
        w = weight.float()
        dz1, dz2 = a1 * mult, a2 * mult  # sums over L of dz and dz * xhat
        n = cpg * L
        k1 = (dz1 * w).view(B, num_groups, cpg).sum(-1) / n
        k2 = (dz2 * w).view(B, num_groups, cpg).sum(-1) / n
        dx = torch.empty_like(x3)
        block = _block(L)
        _bwd_dx_kernel[(B * C, triton.cdiv(L, block))](x3, dy3, dx, weight, bias, scale_c, shift_c, mean, rstd,
                                                       k1.contiguous().view(-1), k2.contiguous().view(-1), C, L, cpg, BLOCK=block, **flags)
        dweight = dz2.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = dz1.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        dscale = (a2 * w + a1 * bias.float()).to(scale.dtype) if scale is not None and ctx.needs_input_grad[3] else None
        dshift = a1.to(shift.dtype) if shift is not None and ctx.needs_input_grad[4] else None
        return dx.view(shape), dweight, dbias, dscale, dshift, None, None, None
