"""Where the Triton kernels run: CUDA tensors, or any tensor under the Triton interpreter."""

import os

import torch


def use_triton(x: torch.Tensor) -> bool:
    """True when x should go through a Triton kernel rather than the PyTorch reference."""
    if os.environ.get("KERNELS_FORCE_REFERENCE", "0") == "1":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return x.is_cuda
