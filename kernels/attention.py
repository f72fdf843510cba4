"""Multi-head self-attention straight from a fused qkv projection's [B, 3*heads*ch, T] layout."""

import math
from typing import Tuple

import torch

from . import self_check
from .dispatch import reference_vjp, run_triton_or_reference, use_triton

ORDERS = ("legacy", "new")


def split_qkv(
    qkv: torch.Tensor, num_heads: int, order: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _shape_class(qkv: torch.Tensor, num_heads: int, order: str) -> tuple:
    """The self-check's key: what the Triton launches for this input compile for."""
    from . import attention_triton

    return ("qkv_attention", *attention_triton.shape_class(qkv, num_heads, order))


def _self_check(qkv: torch.Tensor, num_heads: int, order: str) -> bool:
    """The kernels' forward and backward on this input against the reference (kernels.self_check)."""
    from . import attention_triton

    def kernel(dout):
        out, lse = attention_triton.forward(qkv, num_heads, order)
        return out, [attention_triton.backward(dout, qkv, out, lse, num_heads, order)]

    B, width, T = qkv.shape
    tf32 = qkv.is_cuda and qkv.dtype == torch.float32  # kernels.qkv_attention sends fp32 here only with TF32
    tolerance = self_check.TF32_TOLERANCE if tf32 else self_check.TOLERANCES[qkv.dtype]
    where = f"{qkv.device} {qkv.dtype} {list(qkv.shape)} ({num_heads} heads, {order} order)"
    return self_check.check(
        "qkv_attention",
        where,
        [qkv],
        (B, width // 3, T),
        kernel,
        lambda qkv_: qkv_attention_reference(qkv_, num_heads, order),
        tolerance,
    )


@torch.library.custom_op("iddpm_kernels::qkv_attention", mutates_args=())
def _qkv_attention_op(qkv: torch.Tensor, num_heads: int, order: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): the Triton flash forward and its float32 row log-sum-exp [B*H, T]. The first input of
    each shape class is self-checked. Where Triton cannot build the kernel or its shape class failed the
    check, the reference computes out (lse is then unused: the backward falls back too)."""
    qkv = qkv.contiguous()

    def triton_forward():
        from . import attention_triton

        return attention_triton.forward(qkv, num_heads, order)

    def reference_forward():
        return qkv_attention_reference(qkv, num_heads, order).contiguous(), _empty_lse(qkv, num_heads)

    return run_triton_or_reference(
        "qkv_attention",
        triton_forward,
        reference_forward,
        _shape_class(qkv, num_heads, order),
        lambda: _self_check(qkv, num_heads, order),
    )


def _empty_lse(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0] * num_heads, qkv.shape[2], dtype=torch.float32)


@_qkv_attention_op.register_fake
def _(qkv, num_heads, order):
    B, width, T = qkv.shape
    return qkv.new_empty(B, width // 3, T), _empty_lse(qkv, num_heads)


@torch.library.custom_op("iddpm_kernels::qkv_attention_backward", mutates_args=())
def _qkv_attention_backward_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int, order: str
) -> torch.Tensor:
    """dqkv [B, 3*H*D, T], contiguous. Where the forward fell back, autograd through the reference."""
    qkv = qkv.contiguous()

    def triton_backward():
        from . import attention_triton

        return attention_triton.backward(dout.contiguous(), qkv, out, lse, num_heads, order)

    def reference_backward():
        _, (dqkv,) = reference_vjp(lambda t: qkv_attention_reference(t, num_heads, order), [qkv], dout)
        return dqkv.contiguous()

    return run_triton_or_reference(
        "qkv_attention", triton_backward, reference_backward, _shape_class(qkv, num_heads, order)
    )


@_qkv_attention_backward_op.register_fake
def _(dout, qkv, out, lse, num_heads, order):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, order = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.args = (num_heads, order)


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return _qkv_attention_backward_op(dout, qkv, out, lse, *ctx.args), None, None


_qkv_attention_op.register_autograd(_backward, setup_context=_setup_context)


def qkv_attention(qkv: torch.Tensor, num_heads: int, order: str = "legacy") -> torch.Tensor:
    """Attention of qkv [B, 3*heads*ch, T] -> [B, heads*ch, T]; differentiable in qkv.

    The Triton kernel runs as the custom op `iddpm_kernels::qkv_attention`, which torch.compile keeps in
    its graph; elsewhere the reference runs.
    """
    split_qkv(qkv, num_heads, order)  # validates before any kernel launch
    # fp32 at full precision stays with PyTorch on a GPU: exact fp32 (FMA) dots do not fit a flash kernel's
    # registers; with torch.backends.cuda.matmul.allow_tf32 the kernel runs them in TF32, as cuBLAS would.
    exact_fp32 = qkv.is_cuda and qkv.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    # Triton's CPU interpreter multiplies the raw bits of bf16 dot operands (triton-lang/triton#11584,
    # unsupported upstream): its answer would be garbage, so bf16 on CPU stays with PyTorch. GPUs run bf16 in
    # the kernel.
    interpreted_bf16 = not qkv.is_cuda and qkv.dtype == torch.bfloat16
    if use_triton(qkv) and not exact_fp32 and not interpreted_bf16:
        return _qkv_attention_op(qkv, num_heads, order)[0]
    return qkv_attention_reference(qkv, num_heads, order)
