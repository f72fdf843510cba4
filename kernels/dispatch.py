"""Where the Triton kernels run: CUDA tensors, or any tensor under the Triton interpreter; and, per shape
class, whether they still do (a kernel that cannot build, or failed its self-check, gives way to the
reference)."""

import contextlib
import os
import threading
import warnings
from collections import Counter
from typing import Callable, Hashable, List, Optional, Sequence, Tuple, TypeVar

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


def self_check_enabled() -> bool:
    """The self-check on first use (kernels.self_check), unless KERNELS_SELF_CHECK=0."""
    return os.environ.get("KERNELS_SELF_CHECK", "1") != "0"


def reference_vjp(
    reference: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], cotangent: torch.Tensor
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """(reference(*inputs), the gradients of <output, cotangent> with respect to inputs), from inside a
    custom op.

    An op's implementation runs below the autograd dispatch key, and in a compiled graph under the
    runtime's dispatch modes, where neither autograd nor torch.func can differentiate. Dispatch state is
    per thread, so a fresh thread differentiates as plain eager code does; on a GPU it runs on the
    caller's stream.
    """
    device = inputs[0].device
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    result = {}

    def work():
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                leaves = [t.detach().requires_grad_() for t in inputs]
                y = reference(*leaves)
                result["out"] = y.detach(), torch.autograd.grad(y, leaves, cotangent)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["out"]


def specialisation(*ints: int) -> tuple:
    """How Triton specialises a kernel's integer arguments (a multiple of 16, or 1): two launches that
    differ here run different compiled code, so they are different shape classes."""
    return tuple((v % 16 == 0, v == 1) for v in ints)


_broken = set()  # ops whose Triton kernel cannot build on this device
_verdicts = {}  # shape class -> whether its self-check passed
launches = Counter()  # Triton launches per op, forward and backward


def fallbacks() -> List[str]:
    """The ops and shape classes now running the reference instead of their kernel."""
    failed = [" ".join(map(str, key)) for key, ok in _verdicts.items() if not ok]
    return sorted(_broken) + failed


def reset() -> None:
    """Forget every fallback and verdict (a benchmark tries each shape afresh)."""
    _broken.clear()
    _verdicts.clear()


def run_triton_or_reference(
    name: str,
    triton_fn: Callable[[], T],
    reference_fn: Callable[[], T],
    shape_class: Optional[Hashable] = None,
    check: Optional[Callable[[], bool]] = None,
) -> T:
    """Run triton_fn(), unless op `name` cannot build here or `shape_class` failed its self-check.

    The first call of a shape class with a `check` runs it (kernels.self_check): a mismatch sends that
    shape class to reference_fn() for good. If Triton cannot compile or fit the kernel on this device,
    warn once and use reference_fn() from then on, so a training run never dies of a kernel build problem.
    A backward op passes its forward's shape class and no check: it follows the forward's verdict.
    """
    if name not in _broken and _verdicts.get(shape_class, True):
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        try:
            if check is not None and shape_class not in _verdicts and self_check_enabled():
                _verdicts[shape_class] = check()
            if _verdicts.get(shape_class, True):
                launches[name] += 1
                return triton_fn()
        except (CompilationError, OutOfResources) as e:
            _broken.add(name)
            warnings.warn(
                f"Triton kernel {name} is unavailable here ({type(e).__name__}: {first_line(e)}); "
                "using the PyTorch reference instead"
            )
    return reference_fn()
