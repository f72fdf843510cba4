"""Fused kernels for diffusion UNets: GroupNorm(+scale-shift)+SiLU and multi-head attention.

Each entry point runs its Triton kernel on CUDA tensors (and on CPU tensors
when TRITON_INTERPRET=1, for testing), and its PyTorch reference elsewhere.
Set KERNELS_FORCE_REFERENCE=1 to always use the reference (debugging).
"""

from .attention import qkv_attention, qkv_attention_reference
from .group_norm import group_norm_silu, group_norm_silu_reference

__all__ = ["group_norm_silu", "group_norm_silu_reference", "qkv_attention", "qkv_attention_reference"]
