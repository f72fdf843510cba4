"""Triton GroupNorm(+scale-shift)(+SiLU): the forward and backward launches (group_norm.py wraps them in a
custom op with autograd, beside the reference).

Layout: x is [B, C, L] (L = H*W, any size), element (b, c, l) at b*C*L + c*SC + l*SL:
contiguous (SC, SL) = (L, 1), or channels-last (1, C), so a channels_last UNet is
read in place. A row is one (b, c) pair's L elements; a group is cpg = C / G rows.

    xhat = (x - mean_g) * rstd_g          z = xhat * w + b
    u = z * (1 + scale) + shift           y = silu(u)  (or u)

Two paths, chosen per shape by `plan`:
- resident: one program holds a whole group in registers, so the forward reads
  x once and writes y once, and the backward reads x and dy once and writes dx:
  the least traffic possible. Used while a group has at most RESIDENT_MAX
  elements (every norm of the 64 px IDDPM UNet).
- split: larger groups (256x256 feature maps) are cut into SPLIT_BLOCK-element
  pieces so the whole device works on few groups. Forward = partial statistics
  pass + apply pass; backward = partial sums pass + dx pass. Each piece's
  statistics are exact (two-pass in registers) and are merged with Chan's
  formula, so no sum-of-squares cancellation.

Both paths also write dscale and dshift, and per-row partials of dweight and
dbias that one small kernel sums over the batch: the backward is two or three
launches whatever the pattern.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import specialisation

# Padded elements of a 16-bit group one program keeps in registers (half that for fp32 x).
RESIDENT_MAX = 16384
SPLIT_BLOCK = 4096  # elements per program on the split path


@triton.jit
def _modulation(W, Bias, Scale, Shift, c, row, mask, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Channel affine (w, b) and modulation (1 + scale, shift) for channel c of row = b*C + c (any shape)."""
    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + c, mask=mask, other=0.0).to(tl.float32)
    mult = 1.0
    if HAS_SCALE:
        mult = 1.0 + tl.load(Scale + row, mask=mask, other=0.0).to(tl.float32)
    add = 0.0
    if HAS_SHIFT:
        add = tl.load(Shift + row, mask=mask, other=0.0).to(tl.float32)
    return w, bias, mult, add


@triton.jit
def _grad_u(xhat, dy, w, bias, mult, add, SILU: tl.constexpr):
    """dL/du from dL/dy: through SiLU when it is applied, u = (xhat*w + b) * mult + add."""
    if SILU:
        u = (xhat * w + bias) * mult + add
        sig = tl.sigmoid(u)
        dy = dy * sig * (1.0 + u * (1.0 - sig))
    return dy


@triton.jit
def _store_row_grads(
    R, DScale, DShift, n_rows,  # out: see _bwd_resident_kernel
    row, a1, a2, w, bias, mult, mask,  # the row's index, sums and parameters (any shape)
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
):  # fmt: skip
    """From a1 = sum_L du and a2 = sum_L du*xhat of a row: R[0] dweight and R[1] dbias partials (fp32),
    dscale, dshift."""
    tl.store(R + row, mult * a2, mask=mask)
    tl.store(R + n_rows + row, mult * a1, mask=mask)
    if HAS_SCALE:
        tl.store(DScale + row, (w * a2 + bias * a1).to(DScale.dtype.element_ty), mask=mask)
    if HAS_SHIFT:
        tl.store(DShift + row, a1.to(DShift.dtype.element_ty), mask=mask)


@triton.jit
def _sum_over_batch_kernel(R, DW, DB, B, C, BLOCK: tl.constexpr):
    """dweight[c] = sum_b R[0, b, c] and dbias[c] = sum_b R[1, b, c], in a fixed order (deterministic), cast
    to the parameters' dtype."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, B):
        dw += tl.load(R + b * C + c, mask=mask, other=0.0)
        db += tl.load(R + (B + b) * C + c, mask=mask, other=0.0)
    tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=mask)
    tl.store(DB + c, db.to(DB.dtype.element_ty), mask=mask)


# ---- resident path: grid (B*G,), one group per program, tile [BLOCK_C, BLOCK_L] ----


@triton.jit
def _group_tile(pid, C, L, SC, SL, cpg, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Channels [BLOCK_C, 1], rows [BLOCK_C, 1], element offsets and mask [BLOCK_C, BLOCK_L] of group pid =
    b*G + g."""
    G = C // cpg
    b = pid // G
    k = tl.arange(0, BLOCK_C)[:, None]
    c = (pid % G) * cpg + k
    row = b * C + c
    offs_l = tl.arange(0, BLOCK_L)[None, :]
    row_valid = k < cpg
    # One sample's offsets fit int32; the batch offset may not.
    return c, row, b.to(tl.int64) * C * L + (c * SC + offs_l * SL), row_valid, row_valid & (offs_l < L)


@triton.jit
def _fwd_resident_kernel(
    X, Y,  # in and out, [B, C, L] at strides (SC, SL)
    W, Bias, Scale, Shift,  # affine [C]; modulation [B*C] (read only with HAS_SCALE / HAS_SHIFT)
    Mean, Rstd,  # out: per-group statistics [B*G], float32
    C, L, SC, SL, cpg, eps,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # the group tile: rows (channels) x positions
):  # fmt: skip
    pid = tl.program_id(0)
    c, row, ptrs, row_valid, mask = _group_tile(pid, C, L, SC, SL, cpg, BLOCK_C, BLOCK_L)
    x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
    n = cpg * L
    mean = tl.sum(x) / n
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc) / n + eps)
    w, bias, mult, add = _modulation(W, Bias, Scale, Shift, c, row, row_valid, HAS_SCALE, HAS_SHIFT)
    u = (xc * rstd * w + bias) * mult + add
    if SILU:
        u = u * tl.sigmoid(u)
    tl.store(Y + ptrs, u.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)


@triton.jit
def _bwd_resident_kernel(
    X, DY, DX,  # x and dy in, dx out, [B, C, L] at strides (SC, SL)
    W, Bias, Scale, Shift, Mean, Rstd,  # as the forward's, its statistics now read
    R, DScale, DShift,  # out: per-row dweight / dbias partials [2, B*C] (float32), dscale, dshift [B*C]
    C, L, SC, SL, cpg, n_rows,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = du * (1 + scale) * w."""
    pid = tl.program_id(0)
    c, row, ptrs, row_valid, mask = _group_tile(pid, C, L, SC, SL, cpg, BLOCK_C, BLOCK_L)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    xhat = tl.where(mask, (tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
    dy = tl.load(DY + ptrs, mask=mask, other=0.0).to(tl.float32)
    w, bias, mult, add = _modulation(W, Bias, Scale, Shift, c, row, row_valid, HAS_SCALE, HAS_SHIFT)
    du = tl.where(mask, _grad_u(xhat, dy, w, bias, mult, add, SILU), 0.0)
    a1 = tl.sum(du, axis=1, keep_dims=True)
    a2 = tl.sum(du * xhat, axis=1, keep_dims=True)
    n = cpg * L
    k1 = tl.sum(a1 * mult * w) / n
    k2 = tl.sum(a2 * mult * w) / n
    # Read x and dy again (from L2: this program read them a moment ago) rather than keep both tiles live
    # across the reductions: halves the registers of a large tile (ptxas: 126 -> 82 at 4 x 4096, 16 warps).
    xhat = (tl.load(X + ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32) - mean) * rstd
    du = _grad_u(
        xhat,
        tl.load(DY + ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32),
        w,
        bias,
        mult,
        add,
        SILU,
    )
    tl.store(DX + ptrs, (rstd * (du * mult * w - k1 - xhat * k2)).to(DX.dtype.element_ty), mask=mask)
    _store_row_grads(R, DScale, DShift, n_rows, row, a1, a2, w, bias, mult, row_valid, HAS_SCALE, HAS_SHIFT)


# ---- split path: grid (B*C, NB), block j of one row per program ----


@triton.jit
def _row_block(row, j, C, L, SC, SL, BLOCK: tl.constexpr):
    """Element offsets and mask of block j of row = b*C + c."""
    offs = j * BLOCK + tl.arange(0, BLOCK)
    b = row // C
    return b.to(tl.int64) * C * L + ((row - b * C) * SC + offs * SL), offs < L


@triton.jit
def _fwd_partial_stats_kernel(X, PMean, PM2, C, L, SC, SL, NB, BLOCK: tl.constexpr):
    """Exact mean and M2 = sum((x - mean)^2) of each block."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    ptrs, mask = _row_block(row, j, C, L, SC, SL, BLOCK)
    x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.sum(x) / tl.minimum(BLOCK, L - j * BLOCK)
    xc = tl.where(mask, x - m, 0.0)
    tl.store(PMean + row * NB + j, m)
    tl.store(PM2 + row * NB + j, tl.sum(xc * xc))


@triton.jit
def _group_of(row, C, cpg, NB, BLOCK_P: tl.constexpr):
    """Group index, offsets of its cpg*NB partials, their channels, rows and mask."""
    b = row // C
    g = (row % C) // cpg
    i = tl.arange(0, BLOCK_P)
    first_row = b * C + g * cpg
    return b * (C // cpg) + g, first_row * NB + i, first_row + i // NB, i % NB, i < cpg * NB


@triton.jit
def _fwd_apply_kernel(
    X, Y,
    W, Bias, Scale, Shift,  # affine [C]; modulation [B*C] (read only with HAS_SCALE / HAS_SHIFT)
    PMean, PM2,  # the blocks' statistics [B*C, NB] from _fwd_partial_stats_kernel
    Mean, Rstd,  # out: per-group statistics [B*G]
    C, L, SC, SL, cpg, NB, eps,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,  # elements per block; a group's partials, padded
):  # fmt: skip
    """Merges the group's block statistics (Chan et al.), then normalises block j of the row."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    gid, p_offs, _, p_block, p_mask = _group_of(row, C, cpg, NB, BLOCK_P)
    cnt = tl.where(p_mask, tl.minimum(BLOCK, L - p_block * BLOCK), 0).to(tl.float32)
    pm = tl.load(PMean + p_offs, mask=p_mask, other=0.0)
    n = cpg * L
    mean = tl.sum(cnt * pm) / n
    m2 = tl.sum(tl.load(PM2 + p_offs, mask=p_mask, other=0.0) + cnt * (pm - mean) * (pm - mean))
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    if (j == 0) & (row % cpg == 0):
        tl.store(Mean + gid, mean)
        tl.store(Rstd + gid, rstd)
    ptrs, mask = _row_block(row, j, C, L, SC, SL, BLOCK)
    w, bias, mult, add = _modulation(W, Bias, Scale, Shift, row % C, row, True, HAS_SCALE, HAS_SHIFT)
    u = ((tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd * w + bias) * mult + add
    if SILU:
        u = u * tl.sigmoid(u)
    tl.store(Y + ptrs, u.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_partial_sums_kernel(
    X, DY,
    W, Bias, Scale, Shift, Mean, Rstd,
    PA1, PA2,  # out: sum(du) and sum(du * xhat) of each block [B*C, NB]
    C, L, SC, SL, cpg, NB,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """sum(du) and sum(du * xhat) of each block."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    gid = row // cpg
    ptrs, mask = _row_block(row, j, C, L, SC, SL, BLOCK)
    xhat = tl.where(
        mask,
        (tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32) - tl.load(Mean + gid)) * tl.load(Rstd + gid),
        0.0,
    )
    w, bias, mult, add = _modulation(W, Bias, Scale, Shift, row % C, row, True, HAS_SCALE, HAS_SHIFT)
    du = tl.where(
        mask,
        _grad_u(xhat, tl.load(DY + ptrs, mask=mask, other=0.0).to(tl.float32), w, bias, mult, add, SILU),
        0.0,
    )
    tl.store(PA1 + row * NB + j, tl.sum(du))
    tl.store(PA2 + row * NB + j, tl.sum(du * xhat))


@triton.jit
def _bwd_dx_kernel(
    X, DY, DX,
    W, Bias, Scale, Shift, Mean, Rstd,
    PA1, PA2,  # the blocks' sums from _bwd_partial_sums_kernel
    R, DScale, DShift,  # out: as _bwd_resident_kernel's
    C, L, SC, SL, cpg, NB, n_rows,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """dx of block j of the row from the group's partial sums; block 0 also writes the row's reductions."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    gid, p_offs, p_rows, _, p_mask = _group_of(row, C, cpg, NB, BLOCK_P)
    pw, _, pmult, _ = _modulation(W, Bias, Scale, Shift, p_rows % C, p_rows, p_mask, HAS_SCALE, HAS_SHIFT)
    pa1 = tl.load(PA1 + p_offs, mask=p_mask, other=0.0)
    pa2 = tl.load(PA2 + p_offs, mask=p_mask, other=0.0)
    n = cpg * L
    k1 = tl.sum(pa1 * pw * pmult) / n
    k2 = tl.sum(pa2 * pw * pmult) / n
    mean = tl.load(Mean + gid)
    rstd = tl.load(Rstd + gid)
    ptrs, mask = _row_block(row, j, C, L, SC, SL, BLOCK)
    w, bias, mult, add = _modulation(W, Bias, Scale, Shift, row % C, row, True, HAS_SCALE, HAS_SHIFT)
    xhat = (tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    du = _grad_u(xhat, tl.load(DY + ptrs, mask=mask, other=0.0).to(tl.float32), w, bias, mult, add, SILU)
    tl.store(DX + ptrs, (rstd * (du * mult * w - k1 - xhat * k2)).to(DX.dtype.element_ty), mask=mask)
    if j == 0:
        own = p_mask & (p_rows == row)
        a1 = tl.sum(tl.where(own, pa1, 0.0))
        a2 = tl.sum(tl.where(own, pa2, 0.0))
        _store_row_grads(R, DScale, DShift, n_rows, row, a1, a2, w, bias, mult, True, HAS_SCALE, HAS_SHIFT)


@dataclass(frozen=True)
class Plan:
    """How one (cpg, L) shape is launched: the path, its compile-time block sizes and warps."""

    resident: bool
    constexprs: dict
    num_warps: int


def plan(cpg: int, L: int, element_size: int) -> Plan:
    """Resident when the padded group tile fits RESIDENT_MAX elements (16-bit x; half for fp32 or rows of a
    length not a multiple of 16), split otherwise.

    The limits keep every kernel free of register spills (kernels/compile_report.py).
    """
    block_c, block_l = triton.next_power_of_2(cpg), triton.next_power_of_2(L)
    limit = RESIDENT_MAX // max(1, element_size // 2)
    # Unaligned rows: Triton cannot prove them aligned, so loads are not vectorised and every element carries
    # a pointer.
    if L % 16:
        limit //= 2
    if block_c * block_l <= limit:
        n = block_c * block_l
        # More warps for bigger tiles keeps each thread's share of the tile (registers) bounded.
        return Plan(
            True,
            {"BLOCK_C": block_c, "BLOCK_L": block_l},
            num_warps=16 if n >= 8192 else 8 if n >= 2048 else 4,
        )
    block = min(SPLIT_BLOCK, block_l)
    return Plan(
        False,
        {"BLOCK": block, "BLOCK_P": triton.next_power_of_2(cpg * triton.cdiv(L, block))},
        num_warps=min(8, max(1, block // 512)),
    )


def shape_class(
    x3: torch.Tensor, strides: Tuple[int, int], weight: torch.Tensor, scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], num_groups: int, silu: bool,
) -> tuple:  # fmt: skip
    """What forward() and backward() compile a kernel for at this input: device, dtypes, the plan, the
    flags and the specialisation of the integer arguments (the self-check's key)."""
    B, C, L = x3.shape
    p = plan(C // num_groups, L, x3.element_size())
    dtypes = tuple(str(t.dtype) for t in (x3, weight, scale, shift) if t is not None)
    flags = tuple(_flags(scale, shift, silu).values())
    layout = specialisation(C, L, *strides, C // num_groups)
    return str(x3.device), dtypes, p.resident, tuple(p.constexprs.items()), p.num_warps, flags, layout


def _flags(scale, shift, silu):
    return dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu)


def forward(
    x3: torch.Tensor, strides: Tuple[int, int], weight: torch.Tensor, bias: torch.Tensor,
    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int, eps: float, silu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y3, mean, rstd): y3 = silu(group_norm(x3) * (1 + scale) + shift) laid out like x3 [B, C, L], whose
    (channel, position) strides are `strides`; per-group float32 mean and rstd [B * num_groups] for the
    backward. See kernels.group_norm.group_norm_silu."""
    B, C, L = x3.shape
    SC, SL = strides
    cpg = C // num_groups
    p = plan(cpg, L, x3.element_size())
    mean = torch.empty(B * num_groups, device=x3.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    # Absent scale/shift: any tensor as the pointer argument; the kernels never read it.
    scale_c = scale.contiguous() if scale is not None else mean
    shift_c = shift.contiguous() if shift is not None else mean
    y = torch.empty_like(x3)
    params, layout = (weight, bias, scale_c, shift_c), (C, L, SC, SL, cpg)
    meta = dict(**_flags(scale, shift, silu), **p.constexprs, num_warps=p.num_warps)
    if p.resident:
        _fwd_resident_kernel[(B * num_groups,)](x3, y, *params, mean, rstd, *layout, eps, **meta)
    else:
        nb = triton.cdiv(L, p.constexprs["BLOCK"])
        pmean = torch.empty(B * C * nb, device=x3.device, dtype=torch.float32)
        pm2 = torch.empty_like(pmean)
        _fwd_partial_stats_kernel[(B * C, nb)](
            x3, pmean, pm2, C, L, SC, SL, nb, BLOCK=p.constexprs["BLOCK"], num_warps=p.num_warps
        )
        _fwd_apply_kernel[(B * C, nb)](x3, y, *params, pmean, pm2, mean, rstd, *layout, nb, eps, **meta)
    return y, mean, rstd


def backward(
    dy3: torch.Tensor, x3: torch.Tensor, strides: Tuple[int, int], weight: torch.Tensor, bias: torch.Tensor,
    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    num_groups: int, silu: bool,
) -> Tuple[torch.Tensor, ...]:  # fmt: skip
    """(dx3, dweight, dbias, dscale, dshift) of forward(); dy3 and dx3 are laid out like x3, and dscale /
    dshift are empty tensors where scale / shift are None."""
    B, C, L = x3.shape
    SC, SL = strides
    cpg = C // num_groups
    p = plan(cpg, L, x3.element_size())
    scale_c = scale.contiguous() if scale is not None else mean
    shift_c = shift.contiguous() if shift is not None else mean
    dx = torch.empty_like(x3)
    red = torch.empty(2, B * C, device=x3.device, dtype=torch.float32)
    dscale = torch.empty_like(scale_c) if scale is not None else red
    dshift = torch.empty_like(shift_c) if shift is not None else red
    params, layout = (weight, bias, scale_c, shift_c, mean, rstd), (C, L, SC, SL, cpg)
    flags = _flags(scale, shift, silu)
    meta = dict(**flags, **p.constexprs, num_warps=p.num_warps)
    if p.resident:
        _bwd_resident_kernel[(B * num_groups,)](
            x3, dy3, dx, *params, red, dscale, dshift, *layout, B * C, **meta
        )
    else:
        nb = triton.cdiv(L, p.constexprs["BLOCK"])
        pa1 = torch.empty(B * C * nb, device=x3.device, dtype=torch.float32)
        pa2 = torch.empty_like(pa1)
        block = dict(BLOCK=p.constexprs["BLOCK"], num_warps=p.num_warps)
        _bwd_partial_sums_kernel[(B * C, nb)](x3, dy3, *params, pa1, pa2, *layout, nb, **flags, **block)
        _bwd_dx_kernel[(B * C, nb)](
            x3, dy3, dx, *params, pa1, pa2, red, dscale, dshift, *layout, nb, B * C, **meta
        )
    dweight, dbias = torch.empty_like(weight), torch.empty_like(bias)
    block = min(1024, triton.next_power_of_2(C))
    _sum_over_batch_kernel[(triton.cdiv(C, block),)](red, dweight, dbias, B, C, BLOCK=block)
    return (
        dx,
        dweight,
        dbias,
        dscale if scale is not None else x3.new_empty(0),
        dshift if shift is not None else x3.new_empty(0),
    )
