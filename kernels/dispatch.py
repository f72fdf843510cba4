"""Where the Triton kernels run: CUDA tensors, or any tensor under the Triton interpreter."""

import os
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line ('' if it has none). kernels/ imports nothing from
    iddpm_ds, so it keeps this one-liner of its own."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def use_triton(x: torch.Tensor) -> bool:
    """True when x should go through a Triton kernel rather than the PyTorch reference."""
    if os.environ.get("KERNELS_FORCE_REFERENCE", "0") == "1":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return x.is_cuda


_broken = set()


def run_triton_or_reference(name: str, triton_fn: Callable[[], T], reference_fn: Callable[[], T]) -> T:
    """Run triton_fn(); if Triton cannot compile or fit the kernel on this device, warn once and use
    reference_fn() from then on, so a training run never dies of a kernel build problem."""
    if name not in _broken:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        try:
            return triton_fn()
        except (CompilationError, OutOfResources) as e:
            import warnings

            _broken.add(name)
            warnings.warn(
                f"Triton kernel {name} is unavailable here ({type(e).__name__}: {first_line(e)}); "
                "using the PyTorch reference instead"
            )
    return reference_fn()
