"""Build every kernel launch of the benchmark shapes for a GPU, on any machine, and report its resources.

    python kernels/compile_report.py [--arch 90] [--out report.json]

No GPU is needed: the kernels' forward and backward run on "meta"
tensors with the Triton launches recorded instead of run, and each distinct
launch is compiled by Triton for the target and assembled by ptxas -v. The
table gives registers per thread, spilled bytes, shared memory per program,
an estimate of the warps resident per SM, and the tensor-core instruction the
dots became (wgmma on Hopper; mma.sync is the slower per-warp path there). Exit status 1 when a launch
spills or needs more shared memory than the target has: a spill costs local
memory traffic in the inner loop, and too much shared memory fails at launch.
Run it without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from kernels import attention_triton, group_norm_triton
from kernels.bench import ATTN_SHAPES, GN_SHAPES
from kernels.group_norm import rows_view

# Per-SM limits of the targets we build for: registers, shared memory per program (bytes), resident warps.
SM_LIMITS = {80: (65536, 166912, 64), 89: (65536, 101376, 48), 90: (65536, 232448, 64)}


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# The benchmark's shapes (bf16), then the corners of what the kernels accept: other dtypes (fp32 dots run
# in IEEE precision and take more registers), channels per group not a power of two, odd sizes, head dims
# 32 and 128 at the shortest and longest sequences, sequences that are not a multiple of 16.
GN_WORK = [(s, k, BF16) for s, k in GN_SHAPES] + [
    ((64, 128, 64, 64), "silu", FP32),
    ((8, 96, 128, 128), "ss", FP32),
    ((4, 192, 33, 33), "silu", FP16),
    ((2, 64, 7, 7), "plain", FP32),
]
ATTN_WORK = (
    [(shape, BF16) for shape in ATTN_SHAPES]
    + [((2, 4, T, D), BF16) for T in (16, 4096) for D in (32, 128)]
    + [((2, 4, 256, D), FP32) for D in (64, 96, 128)]
    + [((2, 4, 64, 64), FP32), ((2, 4, 1000, 64), FP16), ((2, 4, 196, 128), BF16), ((2, 4, 49, 32), FP32)]
)


@contextlib.contextmanager
def recorded_launches():
    """Within the block, launching any kernel of kernels/ appends (kernel, args, kwargs) to the yielded list
    instead."""
    launches = []
    kernels = [
        obj
        for module in (group_norm_triton, attention_triton)
        for obj in vars(module).values()
        if isinstance(obj, JITFunction)
    ]
    if not kernels:
        sys.exit(
            "compile_report.py: the kernels were built for the interpreter; run without TRITON_INTERPRET=1"
        )
    for k in kernels:
        k.run = lambda *args, grid, warmup, _k=k, **kwargs: launches.append((_k, args, kwargs))
    try:
        yield launches
    finally:
        for k in kernels:
            del k.run


def group_norm_launches(shape, pattern, dtype):
    B, C = shape[:2]
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(shape, **meta)
    w, b = torch.empty(C, **meta), torch.empty(C, **meta)
    scale = torch.empty(B, C, **meta) if pattern == "ss" else None
    shift = torch.empty(B, C, **meta) if pattern == "ss" else None
    x3, strides = rows_view(x)
    with recorded_launches() as launches:
        y3, mean, rstd = group_norm_triton.forward(
            x3, strides, w, b, scale, shift, 32, 1e-5, pattern != "plain"
        )
        group_norm_triton.backward(
            torch.empty_like(y3), x3, strides, w, b, scale, shift, mean, rstd, 32, pattern != "plain"
        )
    return launches


def attention_launches(B, H, T, D, dtype, arch):
    attention_triton.device_capability = lambda device: arch  # meta tensors have no device to ask
    qkv = torch.empty(B, 3 * H * D, T, device="meta", dtype=dtype)
    with recorded_launches() as launches:
        out, lse = attention_triton.forward(qkv, H, "legacy")
        attention_triton.backward(torch.empty_like(out), qkv, out, lse, H, "legacy")
    return launches


def ptxas_usage(ptx: str, arch: int):
    """(registers per thread, spilled bytes) from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if arch else get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[:500]}")
    regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr))
    return regs, spills


def compile_launch(kernel, args, kwargs, target):
    """Compile one recorded launch for target as JITFunction.run would, without a device."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    consts = {
        kernel.arg_names[path[0]]: v
        for path, v in constexprs.items()
        if isinstance(v, (int, str)) and not isinstance(v, bool)
    }
    return compiled, consts, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch", type=int, default=90, choices=sorted(SM_LIMITS), help="compute capability x10 (90 = H100)"
    )
    p.add_argument("--out", default="")
    args = p.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    max_regs, max_smem, max_warps = SM_LIMITS[args.arch]
    dt = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
    work = [(f"group_norm {list(s)} {k} {dt[d]}", group_norm_launches(s, k, d)) for s, k, d in GN_WORK]
    work += [
        (f"attention {list(shape)} {dt[d]}", attention_launches(*shape, d, args.arch))
        for shape, d in ATTN_WORK
    ]
    rows, cache = [], {}
    for label, launches in work:
        for kernel, largs, lkwargs in launches:
            compiled, consts, options = compile_launch(kernel, largs, lkwargs, target)
            key = compiled.hash
            if key not in cache:
                cache[key] = ptxas_usage(compiled.asm["ptx"], args.arch)
            regs, spills = cache[key]
            smem = compiled.metadata.shared
            warps = options.num_warps
            per_warp = math.ceil(regs * 32 / 256) * 256  # registers are allocated per warp in units of 256
            programs = min(
                max_regs // (per_warp * warps), max_smem // smem if smem else max_warps, max_warps // warps
            )
            ptx = compiled.asm["ptx"]
            # Which tensor-core instructions the dots became: Hopper's warpgroup MMA, the older per-warp
            # mma.sync, both, or none.
            mma = "+".join(
                name for name, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if op in ptx
            )
            rows.append(
                {
                    "shape": label,
                    "kernel": kernel.__name__,
                    "constexprs": consts,
                    "num_warps": warps,
                    "num_stages": options.num_stages,
                    "registers": regs,
                    "spill_bytes": spills,
                    "shared_bytes": smem,
                    "est_warps_per_sm": programs * warps,
                    "mma": mma,
                    "ok": spills == 0 and smem <= max_smem,
                }
            )
    meta = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(
        f"# sm_{args.arch} | triton {meta['triton']} | limits: {max_smem} B shared per program, {max_regs} "
        "registers per SM"
    )
    print(
        f"{'shape':<43} {'kernel':<26} {'blocks':<44} {'warps':>5} {'stg':>3} {'regs':>4} {'spill':>5} "
        f"{'smem':>6} {'warps/SM':>8} {'mma':>14}"
    )
    for r in rows:
        blocks = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k == "D")
        print(
            f"{r['shape']:<43} {r['kernel']:<26} {blocks:<44} {r['num_warps']:>5} {r['num_stages']:>3} "
            f"{r['registers']:>4} {r['spill_bytes']:>5} {r['shared_bytes']:>6} {r['est_warps_per_sm']:>8} "
            f"{r['mma']:>14}{'' if r['ok'] else '  <-- FAIL'}"
        )
    bad = [r for r in rows if not r["ok"]]
    print(
        f"{len(rows)} launches, {len(cache)} distinct kernels, {len(bad)} spilling or over the shared-memory "
        "limit"
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
