"""Triton flash attention read straight from the qkv projection's [B, 3*H*D, T] layout.

For head h the q, k and v blocks are D channel rows of T contiguous
positions each, so a [BLOCK, D] tile is a strided load (T-stride 1, D-stride
T) and no transpose or copy kernel runs. Forward keeps an online softmax and
stores the row log-sum-exp; backward recomputes the probabilities block by
block (FlashAttention-2), so no T x T matrix is ever in memory. Gradients are
written into a [B, 3*H*D, T] tensor of the same layout.

Channel offset of part p (0=q, 1=k, 2=v) of head h: h*head_stride + p*part_stride;
"legacy" (improved-diffusion): head_stride = 3D, part_stride = D;
"new" (guided-diffusion):      head_stride = D,  part_stride = H*D.
"""

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import specialisation


@triton.jit
def _tile_ptrs(base, pos, d, T):
    return base + d[None, :].to(tl.int64) * T + pos[:, None]


@triton.jit
def _program_head(
    H, T, head_stride, part_stride, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr
):
    """This program's head bh = b*H + h (grid axis 1); the element offsets of its q, k, v blocks in qkv and
    of its block in the [B, H*D, T] output; its BLOCK positions (grid axis 0); the head-dim lanes and mask."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qkv_b = b.to(tl.int64) * 3 * H * D * T
    q_off = qkv_b + (h * head_stride) * T
    k_off = qkv_b + (h * head_stride + part_stride) * T
    v_off = qkv_b + (h * head_stride + 2 * part_stride) * T
    o_off = b.to(tl.int64) * H * D * T + (h * D) * T
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return bh, q_off, k_off, v_off, o_off, offs, offs_d, offs_d < D


@triton.jit
def _key_block(QKV, k_off, v_off, offs_n, offs_d, d_mask, T):
    """A key block's k and v tiles [N, D] and their mask."""
    n_mask = (offs_n[:, None] < T) & d_mask[None, :]
    k = tl.load(_tile_ptrs(QKV + k_off, offs_n, offs_d, T), mask=n_mask, other=0.0)
    v = tl.load(_tile_ptrs(QKV + v_off, offs_n, offs_d, T), mask=n_mask, other=0.0)
    return k, v, n_mask


# Kernel signatures are written by hand, an argument group to a line (ruff would put one name per line).
@triton.jit
def _fwd_kernel(
    QKV, Out, LSE,  # in [B, 3*H*D, T]; out [B, H*D, T] and the rows' log-sum-exp [B*H, T]
    H, T, head_stride, part_stride, sm_scale,  # heads, positions, the qkv layout (module docstring)
    D: tl.constexpr, BLOCK_D: tl.constexpr,  # head dim and its power-of-two tile width
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,  # query/key tile rows, dot mode
):  # fmt: skip
    bh, q_off, k_off, v_off, o_off, offs_m, offs_d, d_mask = _program_head(
        H, T, head_stride, part_stride, D, BLOCK_D, BLOCK_M
    )
    q = tl.load(
        _tile_ptrs(QKV + q_off, offs_m, offs_d, T), mask=(offs_m[:, None] < T) & d_mask[None, :], other=0.0
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, _ = _key_block(QKV, k_off, v_off, offs_n, offs_d, d_mask, T)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(offs_n[None, :] < T, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        _tile_ptrs(Out + o_off, offs_m, offs_d, T),
        acc.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < T) & d_mask[None, :],
    )
    # Natural-log LSE of the scaled logits, for the backward recomputation.
    tl.store(
        LSE + bh.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < T
    )


@triton.jit
def _bwd_preprocess(Out, DO, Delta, H, T, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(dO * Out), [B*H, T]."""
    # Only the output offset is used: the qkv strides do not matter here.
    bh, _, _, _, o_off, offs_m, offs_d, d_mask = _program_head(H, T, 0, 0, D, BLOCK_D, BLOCK_M)
    mask = (offs_m[:, None] < T) & d_mask[None, :]
    o = tl.load(_tile_ptrs(Out + o_off, offs_m, offs_d, T), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO + o_off, offs_m, offs_d, T), mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _query_block(QKV, DO, LSE, Delta, q_off, o_off, bh, offs_m, offs_d, d_mask, T):
    """A query block's q and dO tiles [M, D] and its rows' log-sum-exp and Delta, with the row mask."""
    m_valid = offs_m < T
    m_mask = m_valid[:, None] & d_mask[None, :]
    q = tl.load(_tile_ptrs(QKV + q_off, offs_m, offs_d, T), mask=m_mask, other=0.0)
    do = tl.load(_tile_ptrs(DO + o_off, offs_m, offs_d, T), mask=m_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=m_valid, other=0.0)
    return q, do, lse, delta, m_valid, m_mask


@triton.jit
def _bwd_kernel(
    QKV, DO, LSE, Delta,  # the forward's input, dOut, the rows' log-sum-exp and rowsum(dO * Out)
    DQKV,  # out: [B, 3*H*D, T], qkv's layout
    H, T, head_stride, part_stride, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    DQ: tl.constexpr,  # which pass: dK and dV of a key block (False), or dQ of a query block (True)
):  # fmt: skip
    """One program per (key block, b*h) looping over query blocks, or per (query block, b*h) looping over
    key blocks for dQ: two launches, since each pass keeps its own accumulators in registers."""
    if DQ:
        bh, q_off, k_off, v_off, o_off, offs_m, offs_d, d_mask = _program_head(
            H, T, head_stride, part_stride, D, BLOCK_D, BLOCK_M
        )
        q, do, lse, delta, m_valid, m_mask = _query_block(
            QKV, DO, LSE, Delta, q_off, o_off, bh, offs_m, offs_d, d_mask, T
        )
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, T, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, _ = _key_block(QKV, k_off, v_off, offs_n, offs_d, d_mask, T)
            # P = exp(q k^T * scale - lse) and dS = P * (dO v^T - Delta), [M, N]
            p = tl.exp(tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale - lse[:, None])
            p = tl.where(m_valid[:, None] & (offs_n[None, :] < T), p, 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        tl.store(_tile_ptrs(DQKV + q_off, offs_m, offs_d, T), dq.to(DQKV.dtype.element_ty), mask=m_mask)
    else:
        bh, q_off, k_off, v_off, o_off, offs_n, offs_d, d_mask = _program_head(
            H, T, head_stride, part_stride, D, BLOCK_D, BLOCK_N
        )
        k, v, n_mask = _key_block(QKV, k_off, v_off, offs_n, offs_d, d_mask, T)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        n_valid = offs_n < T
        for start_m in range(0, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q, do, lse, delta, m_valid, _ = _query_block(
                QKV, DO, LSE, Delta, q_off, o_off, bh, offs_m, offs_d, d_mask, T
            )
            # Transposed tiles [N, M] (rows = this program's keys): every dot then has BLOCK_N rows, which
            # Hopper's warpgroup MMA needs (64+); with query rows, the small BLOCK_M would put two of the four
            # on mma.sync.
            pT = tl.exp(tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale - lse[None, :])
            pT = tl.where(n_valid[:, None] & m_valid[None, :], pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dsT = pT * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
        dk = dk * sm_scale
        tl.store(_tile_ptrs(DQKV + k_off, offs_n, offs_d, T), dk.to(DQKV.dtype.element_ty), mask=n_mask)
        tl.store(_tile_ptrs(DQKV + v_off, offs_n, offs_d, T), dv.to(DQKV.dtype.element_ty), mask=n_mask)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict:
        """The tile sizes and schedule as a kernel launch takes them."""
        return dict(
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages
        )


def configs(T: int, D: int, capability: Optional[int], fp32: bool = False) -> dict:
    """Launch configuration of each kernel ("fwd", "dkdv", "dq", and "pre" for the Delta pass) for
    sequence length T and head dim D.

    capability is the GPU's compute capability x10 (90 for H100), None in the CPU
    interpreter (tiny tiles keep the tests fast). Chosen so that no kernel spills
    registers on sm_80, sm_89 and sm_90 (python kernels/compile_report.py --arch N
    checks the benchmark shapes and the corners): the backward kernels hold two
    fp32 accumulators, hence their smaller tiles; a T that is not a multiple of 16
    defeats vectorised loads (every element carries its own pointer), hence the
    smaller tiles there too.
    """
    if capability is None:
        return _launch_configs((16, 16, 1, 1), (16, 16, 1, 1), (16, 16, 1, 1), pre=(16, 16, 1, 1))
    small_d, short = D <= 64, T <= 64  # short: one 64-row tile covers the sequence
    # Each kernel's (block_m, block_n, num_warps, num_stages).
    if T % 16:
        dq = (64, 32, 8, 3) if small_d else (32, 64, 8, 3)
        return _launch_configs((32 if fp32 else 64, 32, 8, 3), (32, 32, 8, 3), dq)
    if fp32:  # TF32 dots on fp32 tiles: twice the bytes and registers of a 16-bit tile
        if small_d:
            return _launch_configs((64, 32, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2))
        return _launch_configs((32, 32, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2))
    if capability >= 90:  # larger tiles than one short sequence would be half masked
        if small_d and short:
            return _launch_configs((64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3))
        if small_d:
            return _launch_configs((128, 64, 8, 3), (32, 128, 8, 3), (128, 64, 8, 3))
        if short:
            return _launch_configs((64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 3))
        return _launch_configs((128, 64, 8, 2), (32, 64, 8, 2), (128, 32, 8, 2))
    if small_d:
        return _launch_configs((64 if short else 128, 32, 8, 3), (64, 32, 8, 3), (64, 64, 8, 3))
    return _launch_configs((64, 32, 8, 3), (64, 64, 8, 2), (64 if short else 128, 32, 8, 3))


def _launch_configs(fwd: tuple, dkdv: tuple, dq: tuple, pre: tuple = (64, 0, 8, 1)) -> dict:
    return {
        "fwd": LaunchConfig(*fwd),
        "dkdv": LaunchConfig(*dkdv),
        "dq": LaunchConfig(*dq),
        "pre": LaunchConfig(*pre),
    }


def device_capability(device: torch.device) -> Optional[int]:
    """Compute capability x10 of a CUDA device; None for the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _strides(order: str, H: int, D: int):
    return (3 * D, D) if order == "legacy" else (D, H * D)


@dataclass(frozen=True)
class Geometry:
    """What the forward and backward launches of one qkv shape share."""

    B: int
    T: int
    H: int
    D: int
    BLOCK_D: int
    cfg: dict
    precision: str  # of the dots: fp32 reaches a GPU only when PyTorch allows TF32 (kernels.attention)
    sm_scale: float

    def constexprs(self) -> dict:
        """What every kernel compiles in: the head dim, its tile width and the dots' precision."""
        return dict(D=self.D, BLOCK_D=self.BLOCK_D, PRECISION=self.precision)


def geometry(qkv: torch.Tensor, num_heads: int) -> Geometry:
    B, width, T = qkv.shape
    D = width // (3 * num_heads)
    return Geometry(
        B,
        T,
        num_heads,
        D,
        max(16, triton.next_power_of_2(D)),
        configs(T, D, device_capability(qkv.device), fp32=qkv.dtype == torch.float32),
        "ieee" if qkv.device.type == "cpu" else "tf32",  # the interpreter is exact
        1.0 / math.sqrt(D),
    )


def shape_class(qkv: torch.Tensor, num_heads: int, order: str) -> tuple:
    """What forward() and backward() compile kernels for at this input: device, dtype, order, head dim,
    tiles, the dots' precision and the specialisation of the integer arguments (the self-check's key)."""
    g = geometry(qkv, num_heads)
    layout = specialisation(g.H, g.T, *_strides(order, g.H, g.D))
    return str(qkv.device), str(qkv.dtype), order, *g.constexprs().values(), tuple(g.cfg.items()), layout


def forward(qkv: torch.Tensor, num_heads: int, order: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): softmax(q^T k / sqrt(D)) v per head from contiguous qkv [B, 3*H*D, T] -> out [B, H*D, T],
    and each query row's float32 log-sum-exp [B*H, T] for the backward."""
    g = geometry(qkv, num_heads)
    B, T, H, D = g.B, g.T, g.H, g.D
    head_stride, part_stride = _strides(order, H, D)
    out = torch.empty(B, H * D, T, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B * H, T, device=qkv.device, dtype=torch.float32)
    f = g.cfg["fwd"]
    args = (qkv, out, lse, H, T, head_stride, part_stride, g.sm_scale)
    _fwd_kernel[(triton.cdiv(T, f.block_m), B * H)](*args, **g.constexprs(), **f.launch_kwargs())
    return out, lse


def backward(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int, order: str
) -> torch.Tensor:
    """dqkv [B, 3*H*D, T] of forward(), for contiguous dout, qkv and out."""
    g = geometry(qkv, num_heads)
    B, T, H, D = g.B, g.T, g.H, g.D
    delta = torch.empty_like(lse)
    pre = g.cfg["pre"]
    _bwd_preprocess[(triton.cdiv(T, pre.block_m), B * H)](
        out, dout, delta, H, T, D=D, BLOCK_D=g.BLOCK_D, BLOCK_M=pre.block_m, num_warps=pre.num_warps
    )
    dqkv = torch.empty_like(qkv)
    head_stride, part_stride = _strides(order, H, D)
    args = (qkv, dout, lse, delta, dqkv, H, T, head_stride, part_stride, g.sm_scale)
    for dq, c, blocks in (
        (False, g.cfg["dkdv"], g.cfg["dkdv"].block_n),
        (True, g.cfg["dq"], g.cfg["dq"].block_m),
    ):
        _bwd_kernel[(triton.cdiv(T, blocks), B * H)](*args, **g.constexprs(), **c.launch_kwargs(), DQ=dq)
    return dqkv
