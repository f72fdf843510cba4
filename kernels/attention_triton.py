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
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_ptrs(base, pos, d, T):
    return base + d[None, :].to(tl.int64) * T + pos[:, None]


@triton.jit
def _head_offsets(bh, H, T, head_stride, part_stride, D: tl.constexpr):
    """Element offsets of head (b, h)'s q, k, v blocks in qkv and of its block in the [B, H*D, T] output."""
    b = bh // H
    h = bh % H
    qkv_b = b.to(tl.int64) * 3 * H * D * T
    q_off = qkv_b + (h * head_stride) * T
    k_off = qkv_b + (h * head_stride + part_stride) * T
    v_off = qkv_b + (h * head_stride + 2 * part_stride) * T
    o_off = b.to(tl.int64) * H * D * T + (h * D) * T
    return q_off, k_off, v_off, o_off


# Kernel signatures are written by hand, an argument group to a line (ruff would put one name per line).
@triton.jit
def _fwd_kernel(
    QKV, Out, LSE,  # in [B, 3*H*D, T]; out [B, H*D, T] and the rows' log-sum-exp [B*H, T]
    H, T, head_stride, part_stride, sm_scale,  # heads, positions, the qkv layout (module docstring)
    D: tl.constexpr, BLOCK_D: tl.constexpr,  # head dim and its power-of-two tile width
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,  # query/key tile rows, dot mode
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    q_off, k_off, v_off, o_off = _head_offsets(bh, H, T, head_stride, part_stride, D)
    q_base, k_base, v_base = QKV + q_off, QKV + k_off, QKV + v_off
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(
        _tile_ptrs(q_base, offs_m, offs_d, T), mask=(offs_m[:, None] < T) & d_mask[None, :], other=0.0
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < T) & d_mask[None, :]
        k = tl.load(_tile_ptrs(k_base, offs_n, offs_d, T), mask=kv_mask, other=0.0)
        v = tl.load(_tile_ptrs(v_base, offs_n, offs_d, T), mask=kv_mask, other=0.0)
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
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    base = b.to(tl.int64) * H * D * T + (h * D) * T
    o = tl.load(_tile_ptrs(Out + base, offs_m, offs_d, T), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO + base, offs_m, offs_d, T), mask=mask, other=0.0).to(tl.float32)
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
def _bwd_dkdv_kernel(
    QKV, DO, LSE, Delta,  # the forward's input, dOut, the rows' log-sum-exp and rowsum(dO * Out)
    DQKV,  # out: [B, 3*H*D, T], qkv's layout; this kernel writes the k and v parts
    H, T, head_stride, part_stride, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (key block, b*h): loops over query blocks."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    q_off, k_off, v_off, o_off = _head_offsets(bh, H, T, head_stride, part_stride, D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    n_mask = (offs_n[:, None] < T) & d_mask[None, :]
    k = tl.load(_tile_ptrs(QKV + k_off, offs_n, offs_d, T), mask=n_mask, other=0.0)
    v = tl.load(_tile_ptrs(QKV + v_off, offs_n, offs_d, T), mask=n_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_valid = offs_n < T
    for start_m in range(0, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta, m_valid, _ = _query_block(
            QKV, DO, LSE, Delta, q_off, o_off, bh, offs_m, offs_d, d_mask, T
        )
        # Transposed tiles [N, M] (rows = this program's keys): every dot then has BLOCK_N rows, which
        # Hopper's warpgroup MMA needs (64+); with query rows, the small BLOCK_M would put two of the four on
        # mma.sync.
        pT = tl.exp(tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale - lse[None, :])
        pT = tl.where(n_valid[:, None] & m_valid[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dsT = pT * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(_tile_ptrs(DQKV + k_off, offs_n, offs_d, T), dk.to(DQKV.dtype.element_ty), mask=n_mask)
    tl.store(_tile_ptrs(DQKV + v_off, offs_n, offs_d, T), dv.to(DQKV.dtype.element_ty), mask=n_mask)


@triton.jit
def _bwd_dq_kernel(
    QKV, DO, LSE, Delta,  # as _bwd_dkdv_kernel's
    DQKV,  # out: this kernel writes the q part
    H, T, head_stride, part_stride, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, b*h): loops over key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    q_off, k_off, v_off, o_off = _head_offsets(bh, H, T, head_stride, part_stride, D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q, do, lse, delta, m_valid, m_mask = _query_block(
        QKV, DO, LSE, Delta, q_off, o_off, bh, offs_m, offs_d, d_mask, T
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = (offs_n[:, None] < T) & d_mask[None, :]
        k = tl.load(_tile_ptrs(QKV + k_off, offs_n, offs_d, T), mask=n_mask, other=0.0)
        v = tl.load(_tile_ptrs(QKV + v_off, offs_n, offs_d, T), mask=n_mask, other=0.0)
        # P = exp(q k^T * scale - lse) and dS = P * (dO v^T - Delta), [M, N]
        p = tl.exp(tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale - lse[:, None])
        p = tl.where(m_valid[:, None] & (offs_n[None, :] < T), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(_tile_ptrs(DQKV + q_off, offs_m, offs_d, T), dq.to(DQKV.dtype.element_ty), mask=m_mask)


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
        c = LaunchConfig(16, 16, 1, 1)
        return {"fwd": c, "dkdv": c, "dq": c, "pre": c}
    small_d = D <= 64
    if T % 16:
        return {
            "fwd": LaunchConfig(32 if fp32 else 64, 32, 8, 3),
            "dkdv": LaunchConfig(32, 32, 8, 3),
            "dq": LaunchConfig(64, 32, 8, 3) if small_d else LaunchConfig(32, 64, 8, 3),
            "pre": LaunchConfig(64, 0, 8, 1),
        }
    if fp32:  # TF32 dots on fp32 tiles: twice the bytes and registers of a 16-bit tile
        if small_d:
            cfg = {
                "fwd": LaunchConfig(64, 32, 8, 2),
                "dkdv": LaunchConfig(32, 32, 8, 2),
                "dq": LaunchConfig(64, 32, 8, 2),
            }
        else:
            cfg = {
                "fwd": LaunchConfig(32, 32, 8, 2),
                "dkdv": LaunchConfig(32, 32, 8, 2),
                "dq": LaunchConfig(32, 16, 8, 2),
            }
    elif capability >= 90:
        short = T <= 64  # one 64-row tile covers the sequence: larger tiles would be half masked
        if small_d and short:
            cfg = {
                "fwd": LaunchConfig(64, 64, 4, 3),
                "dkdv": LaunchConfig(32, 64, 4, 3),
                "dq": LaunchConfig(64, 64, 4, 3),
            }
        elif small_d:
            cfg = {
                "fwd": LaunchConfig(128, 64, 8, 3),
                "dkdv": LaunchConfig(32, 128, 8, 3),
                "dq": LaunchConfig(128, 64, 8, 3),
            }
        elif short:
            cfg = {
                "fwd": LaunchConfig(64, 64, 8, 2),
                "dkdv": LaunchConfig(32, 64, 8, 2),
                "dq": LaunchConfig(64, 32, 8, 3),
            }
        else:
            cfg = {
                "fwd": LaunchConfig(128, 64, 8, 2),
                "dkdv": LaunchConfig(32, 64, 8, 2),
                "dq": LaunchConfig(128, 32, 8, 2),
            }
    elif small_d:
        cfg = {
            "fwd": LaunchConfig(64 if T <= 64 else 128, 32, 8, 3),
            "dkdv": LaunchConfig(64, 32, 8, 3),
            "dq": LaunchConfig(64, 64, 8, 3),
        }
    else:
        cfg = {
            "fwd": LaunchConfig(64, 32, 8, 3),
            "dkdv": LaunchConfig(64, 64, 8, 2),
            "dq": LaunchConfig(64 if T <= 64 else 128, 32, 8, 3),
        }
    return {**cfg, "pre": LaunchConfig(64, 0, 8, 1)}


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


def forward(qkv, num_heads: int, order: str):
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


def backward(dout, qkv, out, lse, num_heads: int, order: str):
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
    for kernel, c, blocks in (
        (_bwd_dkdv_kernel, g.cfg["dkdv"], g.cfg["dkdv"].block_n),
        (_bwd_dq_kernel, g.cfg["dq"], g.cfg["dq"].block_m),
    ):
        kernel[(triton.cdiv(T, blocks), B * H)](*args, **g.constexprs(), **c.launch_kwargs())
    return dqkv
