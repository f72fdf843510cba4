"""Kernels that check themselves on first use.

The interpreter tests prove a kernel's arithmetic, not what a device's compiler makes of it (a race between
programs, a masked load the interpreter forgives, a tile miscompiled on one architecture). So the first time
a fused op meets a new shape class on a device where its Triton kernel runs (the device, the dtype and
everything Triton compiles a separate kernel for: tile sizes, flags, layout, which integer arguments are
multiples of 16), it runs the kernel's forward and backward on that very input with a random cotangent, and
its PyTorch reference on the same values in float64, and compares them:

- within bounds: one log line with the errors and the cost (one extra forward and backward of that layer,
  once per shape class), and the kernel runs from then on;
- beyond: one warning naming the op, the shape and the errors, and that shape class runs the reference
  for the rest of the process, so a run never trains on a wrong kernel.

The bound is the interpreter tests' tolerance for the dtype, or twice the reference's own error when it runs
in that dtype, whichever is larger (real activations can be less well conditioned than the tests' random
ones; a kernel as accurate as PyTorch's own ops is not wrong). The cotangent comes from a private generator,
so a check never moves the training's random streams (exact resume holds). KERNELS_SELF_CHECK=0 turns the
checks off.
"""

import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

from .dispatch import reference_vjp

log = logging.getLogger("kernels")

# (output, gradients) bound on rel_err against float64 per input dtype: the interpreter tests' tolerances.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# fp32 attention on a GPU runs its dots in TF32 (10 mantissa bits, as fp16 has).
TF32_TOLERANCE = TOLERANCES[torch.float16]

Tensors = List[torch.Tensor]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-12)) if ref.numel() else 0.0


@dataclass(frozen=True)
class CheckResult:
    op: str
    where: str  # device, dtype, shape and shape class, for the log
    output_error: float
    gradient_error: float
    bound: Tuple[float, float]  # (output, gradients)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.output_error <= self.bound[0] and self.gradient_error <= self.bound[1]

    def line(self) -> str:
        return (
            f"kernel self-check {self.op} on {self.where}: "
            f"{'passed' if self.ok else 'MISMATCH'}, output error {self.output_error:.1e}, gradients "
            f"{self.gradient_error:.1e} (bound {self.bound[0]:.0e} / {self.bound[1]:.0e}); "
            f"{self.seconds * 1e3:.1f} ms, once for this shape class"
        )


results: List[CheckResult] = []  # every check this process ran, in order


def check(
    op: str,
    where: str,
    inputs: Sequence[torch.Tensor],
    out_shape: Sequence[int],
    kernel: Callable[[torch.Tensor], Tuple[torch.Tensor, Tensors]],
    reference: Callable[..., torch.Tensor],
    tolerance: Tuple[float, float],
) -> bool:
    """Run and record one self-check; True when the kernel is within bounds.

    :param inputs: the op's differentiable inputs, as the op received them.
    :param kernel: cotangent dy -> (output, gradients of inputs in order), from the Triton launches.
    :param reference: inputs (cast to any dtype) -> output, differentiable.
    :param tolerance: the (output, gradients) bound against float64 for this dtype.
    """
    x = inputs[0]
    start = time.perf_counter()
    generator = torch.Generator(device=x.device).manual_seed(0)
    dy = torch.randn(tuple(out_shape), generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    y, grads = kernel(dy)
    errors = {}
    for dtype in (torch.float64, x.dtype):
        cast = [t.to(dtype) for t in inputs] if dtype != x.dtype else list(inputs)
        errors[dtype] = reference_vjp(reference, cast, dy.to(dtype))
    y64, grads64 = errors[torch.float64]
    y_native, grads_native = errors[x.dtype]
    output_error = rel_err(y, y64)
    gradient_error = max(rel_err(g, g64) for g, g64 in zip(grads, grads64))
    native_output = rel_err(y_native, y64)
    native_gradients = max(rel_err(g, g64) for g, g64 in zip(grads_native, grads64))
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    result = CheckResult(
        op,
        where,
        output_error,
        gradient_error,
        (max(tolerance[0], 2 * native_output), max(tolerance[1], 2 * native_gradients)),
        time.perf_counter() - start,
    )
    results.append(result)
    if result.ok:
        log.info(result.line())
    else:
        log.warning(result.line() + "; this shape class uses the PyTorch reference from now on")
    return result.ok
