"""Multi-head self-attention straight from a fused qkv projection's [B, 3*heads*ch, T] layout."""

import math

import torch

from .dispatch import run_triton_or_reference, use_triton

ORDERS = ("legacy", "new")


def split_qkv(qkv: torch.Tensor, num_heads: int, order: str):
    """Views q, k, v [B, heads, ch, T] of qkv [B, 3*heads*ch, T].

    "legacy" (improved-diffusion): channels are heads x (q, k, v) x ch;
    "new" (guided-diffusion's QKVAttention): (q, k, v) x heads x ch.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown qkv order {order!r} (expected one of {ORDERS})")
    B, width, T = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not 3 * num_heads ({num_heads}) * head channels")
    ch = width // (3 * num_heads)
    if order == "legacy":
        parts = qkv.view(B, num_heads, 3, ch, T).unbind(2)
    else:
        parts = qkv.view(B, 3, num_heads, ch, T).unbind(1)
    return parts


def qkv_attention_reference(qkv: torch.Tensor, num_heads: int, order: str = "legacy") -> torch.Tensor:
    """PyTorch reference: softmax(q^T k / sqrt(ch)) v per head, softmax in float32 (float64 for float64 qkv);
    returns [B, heads*ch, T]."""
    q, k, v = split_qkv(qkv, num_heads, order)
    B, H, ch, T = q.shape
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale)
    weight = torch.softmax(weight.to(torch.promote_types(weight.dtype, torch.float32)), dim=-1).type(
        qkv.dtype
    )
    return torch.einsum("bhts,bhcs->bhct", weight, v).reshape(B, H * ch, T)


def qkv_attention(qkv: torch.Tensor, num_heads: int, order: str = "legacy") -> torch.Tensor:
    """Attention of qkv [B, 3*heads*ch, T] -> [B, heads*ch, T]; differentiable in qkv."""
    split_qkv(qkv, num_heads, order)  # validates before any kernel launch
    reference = lambda: qkv_attention_reference(qkv, num_heads, order)  # noqa: E731
    # fp32 at full precision stays with PyTorch on a GPU: exact fp32 (FMA) dots do not fit a flash kernel's
    # registers; with torch.backends.cuda.matmul.allow_tf32 the kernel runs them in TF32, as cuBLAS would.
    exact_fp32 = qkv.is_cuda and qkv.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    # Triton's CPU interpreter multiplies the raw bits of bf16 dot operands (triton-lang/triton#11584,
    # unsupported upstream): its answer would be garbage, so bf16 on CPU stays with PyTorch. GPUs run bf16 in
    # the kernel.
    interpreted_bf16 = not qkv.is_cuda and qkv.dtype == torch.bfloat16
    if use_triton(qkv) and not exact_fp32 and not interpreted_bf16:
        from .attention_triton import FlashQKVAttention

        return run_triton_or_reference(
            "qkv_attention", lambda: FlashQKVAttention.apply(qkv, num_heads, order), reference
        )
    return reference()
