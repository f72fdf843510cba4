"""Benchmark the fused kernels against eager PyTorch (their references), torch.compile and SDPA.

    python kernels/bench.py [--out results.json]          (GPU: the full shape list below)
    python kernels/bench.py --sweep [--out sweep.json]    (GPU: time each attention kernel's candidate tiles)
    TRITON_INTERPRET=1 python kernels/bench.py --smoke [--sweep]   (CPU: tiny shapes, checks the script
    itself)

Every provider is timed twice with triton.testing.do_bench (median), on fresh
random inputs; its output and every input gradient are first checked against
a float64 reference on the device, after the allocator is poisoned with NaNs
(an element a kernel forgets to write shows up as NaN). Reports ms, GB/s and %
of a device-to-device copy measured in the same run (GroupNorm), TFLOP/s beside
a bf16 matmul's (attention) and speed-ups. (The UNet's training step with the
kernels on and off is timed by benchmarks/bench_train.py --kernels True.) A
provider that fails is recorded and the run goes on. The table is printed
last, then each kernel goal as met / missed / not measured; --out writes JSON.
"""

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernels import (
    group_norm_silu,
    group_norm_silu_reference,
    qkv_attention,
    qkv_attention_reference,
    self_check,
)

# From the 64 px and 256 px IDDPM UNets (bf16). "ss" = scale-shift + SiLU, "silu" = norm + SiLU, "plain" =
# norm only.
GN_SHAPES = [
    ((64, 128, 64, 64), "silu"),
    ((64, 256, 32, 32), "ss"),
    ((64, 384, 16, 16), "plain"),
    ((64, 512, 8, 8), "ss"),
    ((8, 256, 256, 256), "silu"),
    ((8, 1024, 16, 16), "ss"),
]
# (B, heads, T, D)
ATTN_SHAPES = [
    (64, 4, 256, 96),
    (64, 4, 64, 128),
    (64, 6, 1024, 64),
    (64, 9, 256, 64),
    (64, 12, 64, 64),
    (8, 8, 1024, 64),
]
SMOKE_GN = [((2, 64, 4, 4), "ss"), ((1, 32, 9, 9), "silu")]
SMOKE_ATTN = [(1, 2, 20, 32)]


def sdpa_from_qkv(qkv, heads, backend):
    """SDPA as a drop-in from our [B, 3*H*D, T] layout, transposes included: its fused kernels need each
    head's channels contiguous ([B, H, T, D] with stride 1 on D), so q, k and v are copied into that
    layout."""
    from torch.nn.attention import sdpa_kernel

    B, width, T = qkv.shape
    D = width // (3 * heads)
    q, k, v = (t.contiguous() for t in qkv.view(B, heads, 3, D, T).permute(2, 0, 1, 4, 3).unbind(0))
    with sdpa_kernel(backend):
        o = F.scaled_dot_product_attention(q, k, v)
    return o.permute(0, 1, 3, 2).reshape(B, heads * D, T)


def timed(fn, reps=2):
    """Median ms per call, measured reps times (the spread shows the noise)."""
    if torch.cuda.is_available():
        return [do_bench(fn, return_mode="median") for _ in range(reps)]
    out = []
    for _ in range(reps):  # the interpreter has no device timer, and is slow: wall clock of one call
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def host_us(fn, calls=20) -> float:
    """Host microseconds per call while the device runs behind: Python, autograd and launch overhead. A
    device time near this figure means the op is launch-bound (the small shapes' 20 us goal depends on it)."""
    cuda = torch.cuda.is_available()
    # The interpreter runs everything on the host, slowly: one call tells as much.
    calls = calls if cuda else 1
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def poison(device):
    if device.type == "cuda":  # freed at once: the caching allocator hands out NaN-filled blocks next
        torch.full((torch.cuda.mem_get_info()[0] // 8 // 4,), float("nan"), device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; NaN anywhere in out (an unwritten, poisoned element) gives NaN."""
    return float((out.detach().double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def float64_reference(reference, args, dy):
    """reference's output and the gradients of its tensor arguments, all in float64."""
    args64 = [None if a is None else a.detach().double().requires_grad_() for a in args]
    out = reference(*args64)
    out.backward(dy.double())
    return out.detach(), [a.grad for a in args64 if a is not None]


def fwd_bwd(fn, args, dy):
    def run():
        for a in args:
            if a is not None:
                a.grad = None
        fn(*args).backward(dy)

    return run


def measure(row: dict, fn, args, dy, ref) -> dict:
    """Check fn(*args) and its gradients against ref (float64_reference) on a poisoned allocator, then time
    forward
    and forward+backward. A failure is recorded in the row and the benchmark goes on: a one-shot GPU run must
    report every other number."""
    from kernels import dispatch

    tensors = [a for a in args if a is not None]

    def run_once():
        poison(dy.device)
        for a in tensors:
            a.grad = None
        out = fn(*args)
        out.backward(dy)
        return [out.detach()] + [a.grad for a in tensors]

    try:
        first = run_once()
        row["max_rel_err"] = rel_err(first[0], ref[0])
        row["grad_rel_err"] = max(rel_err(g, r) for g, r in zip(first[1:], ref[1]))
        if row["provider"] == "triton":
            if dispatch.fallbacks():
                raise RuntimeError(f"kernel {dispatch.fallbacks()} fell back to the PyTorch reference")
            # Same inputs, same bits: a result that moves between runs is a race (the kernels reduce in a
            # fixed order).
            row["deterministic"] = all(torch.equal(a, b) for a, b in zip(first, run_once()))
        del first
        row["fwd_ms"] = timed(lambda: fn(*args))
        row["fwd_bwd_ms"] = timed(fwd_bwd(fn, args, dy))
        row["bwd_ms"] = [b - f for f, b in zip(row["fwd_ms"], row["fwd_bwd_ms"])]
        row["host_us_fwd_bwd"] = host_us(fwd_bwd(fn, args, dy))
    except Exception as e:  # noqa: BLE001 - any failure is a result of this provider, not the end of the run
        row["error"] = f"{type(e).__name__}: {dispatch.first_line(e)[:160]}"
    dispatch.reset()  # a kernel that failed at one shape is tried afresh at the next
    label = " ".join(
        str(row[k]) for k in ("op", "shape", "pattern", "provider", "kernel", "tile") if k in row
    )
    if "error" in row:  # printed as it lands, so a run cut off by its time limit still leaves its numbers
        print(f"{label}: FAILED {row['error']}", flush=True)
    else:
        print(
            f"{label}: fwd ms {row['fwd_ms']}, fwd+bwd ms {row['fwd_bwd_ms']}, rel err out "
            f"{row['max_rel_err']:.1e} grads {row['grad_rel_err']:.1e}"
            f"{'' if row.get('deterministic', True) else ', NOT DETERMINISTIC'}",
            flush=True,
        )
    return row


def bench_group_norm(shapes, device, dtype, use_compile):
    rows = []
    for shape, kind in shapes:
        B, C = shape[:2]
        ss = kind == "ss"
        silu = kind != "plain"
        args = [
            torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
            torch.randn(C, device=device, dtype=dtype, requires_grad=True),
            torch.randn(C, device=device, dtype=dtype, requires_grad=True),
            torch.randn(B, C, device=device, dtype=dtype, requires_grad=True) if ss else None,
            torch.randn(B, C, device=device, dtype=dtype, requires_grad=True) if ss else None,
        ]
        dy = torch.randn(shape, device=device, dtype=dtype)

        def eager(x, w, b, scale, shift):  # the reference is the UNet's own unfused chain
            return group_norm_silu_reference(x, w, b, 32, 1e-5, scale=scale, shift=shift, silu=silu)

        providers = {
            "triton": lambda x, w, b, scale, shift: group_norm_silu(
                x, w, b, 32, scale=scale, shift=shift, silu=silu
            ),
            "eager": eager,
        }
        if use_compile:  # specialised to this shape, as a user compiling a fixed-size model would get it
            providers["compile"] = torch.compile(eager, dynamic=False)
        ref = float64_reference(
            lambda x, w, b, scale, shift: group_norm_silu_reference(
                x, w, b, 32, scale=scale, shift=shift, silu=silu
            ),
            args,
            dy,
        )
        n_bytes = args[0].numel() * args[0].element_size()
        for name, fn in providers.items():
            row = measure(
                {"op": "group_norm", "shape": list(shape), "pattern": kind, "provider": name},
                fn,
                args,
                dy,
                ref,
            )
            # fwd+bwd moves x and y forward, x, dy and dx backward: 5 tensors of x's size.
            if "error" not in row:
                row["fwd_bwd_GBps"] = 5 * n_bytes / (min(row["fwd_bwd_ms"]) * 1e-3) / 1e9
            rows.append(row)
        del ref
    return rows


def bench_attention(shapes, device, dtype, smoke):
    rows = []
    for B, H, T, D in shapes:
        args = [torch.randn(B, 3 * H * D, T, device=device, dtype=dtype, requires_grad=True)]
        dy = torch.randn(B, H * D, T, device=device, dtype=dtype)
        providers = {
            "triton": lambda qkv: qkv_attention(qkv, H),
            "eager": lambda qkv: qkv_attention_reference(qkv, H),
        }
        if device.type == "cuda" and not smoke:
            from torch.nn.attention import SDPBackend

            providers["sdpa_flash"] = lambda qkv: sdpa_from_qkv(qkv, H, SDPBackend.FLASH_ATTENTION)
            providers["sdpa_mem_efficient"] = lambda qkv: sdpa_from_qkv(
                qkv, H, SDPBackend.EFFICIENT_ATTENTION
            )
        ref = float64_reference(lambda qkv: qkv_attention_reference(qkv, H), args, dy)
        flops_fwd = 4 * B * H * T * T * D
        for name, fn in providers.items():
            row = measure({"op": "attention", "shape": [B, H, T, D], "provider": name}, fn, args, dy, ref)
            if "error" not in row:  # backward does 2.5x the forward's matmul work
                row["fwd_TFLOPs"] = flops_fwd / (min(row["fwd_ms"]) * 1e-3) / 1e12
                row["fwd_bwd_TFLOPs"] = 3.5 * flops_fwd / (min(row["fwd_bwd_ms"]) * 1e-3) / 1e12
            rows.append(row)
        del ref
    return rows


# Tile candidates for the attention sweep, (BLOCK_M, BLOCK_N, num_warps, num_stages); none spills on sm_90.
SWEEP = {
    "small_d": {
        "fwd": [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
        "dkdv": [(16, 64, 8, 2), (16, 128, 8, 2), (32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3)],
        "dq": [(64, 64, 4, 3), (64, 128, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
    },
    "large_d": {
        "fwd": [(64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2)],
        "dkdv": [(16, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2)],
        "dq": [(64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
    },
}


def sweep_attention(shapes, device, dtype):
    """For each shape and kernel, every candidate tile of that kernel (the others at their defaults):
    checked, then timed."""
    from kernels import attention_triton

    default_configs = attention_triton.configs
    rows = []
    for B, H, T, D in shapes:
        args = [torch.randn(B, 3 * H * D, T, device=device, dtype=dtype, requires_grad=True)]
        dy = torch.randn(B, H * D, T, device=device, dtype=dtype)
        ref = float64_reference(lambda qkv: qkv_attention_reference(qkv, H), args, dy)
        defaults = default_configs(T, D, attention_triton.device_capability(device))
        for kernel, candidates in SWEEP["small_d" if D <= 64 else "large_d"].items():
            for cand in candidates:
                attention_triton.configs = lambda T_, D_, cap, fp32=False, _k=kernel, _c=cand: {
                    **default_configs(T_, D_, cap, fp32),
                    _k: attention_triton.LaunchConfig(*_c),
                }
                try:
                    row = measure(
                        {
                            "op": "attention",
                            "shape": [B, H, T, D],
                            "provider": "triton",
                            "kernel": kernel,
                            "tile": list(cand),
                            "default": attention_triton.LaunchConfig(*cand) == defaults[kernel],
                        },
                        lambda qkv: qkv_attention(qkv, H),
                        args,
                        dy,
                        ref,
                    )
                finally:
                    attention_triton.configs = default_configs
                rows.append(row)
        del ref
    return rows


def copy_bandwidth(device, smoke) -> float:
    """GB/s of a device-to-device copy of 256 MiB (read + write), the ceiling of a memory-bound kernel."""
    x = torch.empty((1 if smoke else 256) * 2**20 // 2, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = min(timed(lambda: y.copy_(x)))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(device, smoke) -> float:
    """TFLOP/s of a bf16 8192^3 cuBLAS matmul, the dense-math ceiling attention's TFLOP/s compare to."""
    n = 128 if smoke else 8192
    a, b = (
        torch.randn(n, n, device=device, dtype=torch.bfloat16),
        torch.randn(n, n, device=device, dtype=torch.bfloat16),
    )
    return 2 * n**3 / (min(timed(lambda: a @ b)) * 1e-3) / 1e12


# The kernels' speed goals (bf16, measured against the baselines in the same run). GroupNorm shapes whose x
# holds at least LARGE_BYTES are the "large" ones held to the copy-bandwidth goal; 8x8 maps the "small" ones.
LARGE_BYTES = 32 * 2**20
ATTN_VS_SDPA = {64: 1.5, 256: 1.3, 1024: 1.0}  # T -> fwd+bwd speed-up over the faster SDPA backend
# The largest relative error allowed in the output and every gradient, per dtype.
TOLERANCE = {"torch.float32": 1e-4, "torch.bfloat16": 2e-2, "torch.float16": 5e-3}


def goals(report: dict) -> list:
    """Each kernel goal against one run's report: {"goal", "measured", "target", "ok"}; ok is None where
    the
    run has no measurement (a provider failed or the run was cut off)."""
    rows = [r for r in report["rows"] if "error" not in r]

    def best(op, shape, providers, key="fwd_bwd_ms"):
        found = [
            min(r[key]) for r in rows if r["op"] == op and r["shape"] == shape and r["provider"] in providers
        ]
        return min(found) if found else None

    out = []

    def add(goal, measured, target, at_least=True):
        ok = None if measured is None else (measured >= target if at_least else measured <= target)
        out.append({"goal": goal, "measured": measured, "target": target, "at_least": at_least, "ok": ok})

    def ratio(num, den):
        return None if num is None or den is None else num / den

    for r in report["rows"]:
        if r["provider"] != "triton":
            continue
        name = f"{r['op']} {r['shape']} {r.get('pattern', '')}".rstrip()
        tol = TOLERANCE[report["meta"]["dtype"]]
        add(
            f"{name}: max rel err, output and gradients",
            max(r["max_rel_err"], r["grad_rel_err"]) if "error" not in r else None,
            tol,
            at_least=False,
        )
        mine = best(r["op"], r["shape"], {"triton"})
        if r["op"] == "group_norm":
            if math.prod(r["shape"]) * 2 >= LARGE_BYTES:
                add(f"{name}: fwd+bwd % of copy bandwidth", r.get("pct_of_copy"), 80.0)
            add(
                f"{name}: fwd+bwd speed-up over eager",
                ratio(best("group_norm", r["shape"], {"eager"}), mine),
                4.0,
            )
            add(
                f"{name}: fwd+bwd speed-up over torch.compile",
                ratio(best("group_norm", r["shape"], {"compile"}), mine),
                1.3,
            )
            if math.prod(r["shape"][2:]) <= 64:
                add(f"{name}: fwd+bwd us", None if mine is None else mine * 1e3, 20.0, at_least=False)
        else:
            B, H, T, D = r["shape"]
            if T in ATTN_VS_SDPA:
                add(
                    f"{name}: fwd+bwd speed-up over SDPA (faster backend)",
                    ratio(best("attention", r["shape"], {"sdpa_flash", "sdpa_mem_efficient"}), mine),
                    ATTN_VS_SDPA[T],
                )
            if T == 1024 and D == 64:
                add(f"{name}: fwd TFLOP/s", r.get("fwd_TFLOPs"), 250.0)
    return out


def print_report(report: dict) -> None:
    meta, rows = report["meta"], report["rows"]
    print(
        f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} | "
        f"{meta['dtype']} | "
        f"copy {report['copy_GBps']:.0f} GB/s | bf16 matmul {report['matmul_TFLOPs']:.0f} TFLOP/s"
    )
    print(
        f"{'op':<10} {'shape':<22} {'pattern':<6} {'provider':<19} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} "
        f"{'GB/s|TF/s':>10} {'%copy':>6} "
        f"{'triton x':>8} {'err':>8} {'grad err':>8} {'same bits':>9} {'host us':>8}"
    )
    for r in rows:
        head = f"{r['op']:<10} {str(r['shape']):<22} {r.get('pattern', ''):<6} {r['provider']:<19}"
        if "error" in r:
            print(f"{head} FAILED {r['error']}")
            continue
        rate = r.get("fwd_bwd_GBps", r.get("fwd_bwd_TFLOPs"))
        print(
            f"{head} {min(r['fwd_ms']):>9.3f} {min(r['bwd_ms']):>9.3f} {min(r['fwd_bwd_ms']):>9.3f} "
            f"{rate:>10.1f} "
            f"{r.get('pct_of_copy', math.nan):>6.1f} {r.get('triton_speedup_fwd_bwd', math.nan):>8.2f} "
            f"{r['max_rel_err']:>8.1e} {r['grad_rel_err']:>8.1e} "
            f"{ {True: 'yes', False: 'NO', None: ''}[r.get('deterministic')]:>9} {r['host_us_fwd_bwd']:>8.0f}"
        )
    verdicts = report["goals"]
    print(
        f"# kernel goals: {sum(g['ok'] is True for g in verdicts)} met, "
        f"{sum(g['ok'] is False for g in verdicts)} missed, "
        f"{sum(g['ok'] is None for g in verdicts)} not measured"
    )
    for g in verdicts:
        mark = {True: "met", False: "MISSED", None: "not measured"}[g["ok"]]
        measured = "-" if g["measured"] is None else f"{g['measured']:.4g}"
        print(f"  {g['goal']:<80} {measured:>10} {'>=' if g['at_least'] else '<='} {g['target']:<8g} {mark}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument(
        "--out",
        default="",
        help="write the report as JSON (rewritten after each section, so a cut-off run keeps what it "
        "measured)",
    )
    p.add_argument("--no_compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument(
        "--sweep", action="store_true", help="time the candidate tiles of each attention kernel instead"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the kernels' self-check lines
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench.py: no GPU; run with TRITON_INTERPRET=1 and --smoke to check the script on CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "dtype": str(dtype),
    }

    def save(report):  # after every shape, atomically: a run killed by its time limit keeps a readable file
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(args.out + ".tmp", args.out)

    if args.sweep:
        sweep = {"meta": meta, "sweep": []}
        for shape in SMOKE_ATTN if args.smoke else ATTN_SHAPES:
            sweep["sweep"] += sweep_attention([shape], device, dtype)
            save(sweep)
        return
    report = {
        "meta": meta,
        "copy_GBps": copy_bandwidth(device, args.smoke),
        "matmul_TFLOPs": matmul_tflops(device, args.smoke),
        "rows": [],
    }
    for shape in SMOKE_GN if args.smoke else GN_SHAPES:
        report["rows"] += bench_group_norm(
            [shape], device, dtype, use_compile=not (args.smoke or args.no_compile)
        )
        save(report)
    for shape in SMOKE_ATTN if args.smoke else ATTN_SHAPES:
        report["rows"] += bench_attention([shape], device, dtype, args.smoke)
        save(report)
    for r in report["rows"]:
        if "error" in r:
            continue
        if r["op"] == "group_norm":
            r["pct_of_copy"] = 100 * r["fwd_bwd_GBps"] / report["copy_GBps"]
        mine = [
            q
            for q in report["rows"]
            if q["op"] == r["op"]
            and q["shape"] == r["shape"]
            and q["provider"] == "triton"
            and "error" not in q
        ]
        if mine:
            r["triton_speedup_fwd_bwd"] = min(r["fwd_bwd_ms"]) / min(mine[0]["fwd_bwd_ms"])
    report["self_check"] = [{**dataclasses.asdict(c), "ok": c.ok} for c in self_check.results]
    report["goals"] = goals(report)
    save(report)
    print_report(report)


if __name__ == "__main__":
    main()
