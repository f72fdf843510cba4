"""Benchmark the fused kernels against eager PyTorch, torch.compile and SDPA, and a UNet training step.

    python kernels/bench.py [--out results.json]          (GPU: the full shape list below)
    python kernels/bench.py --sweep [--out sweep.json]    (GPU: time each attention kernel's candidate tiles)
    TRITON_INTERPRET=1 python kernels/bench.py --smoke     (CPU: tiny shapes, checks the script itself)

Every provider is timed twice with triton.testing.do_bench (median), on fresh
random inputs; outputs are checked against the float64 reference on the
device after the allocator is poisoned with NaNs. Reports ms, GB/s and % of a
device-to-device copy measured in the same run (GroupNorm), TFLOP/s
(attention), speed-ups, and the 64 px IDDPM training step with kernels on/off.
The table is printed last; --out writes JSON.
"""

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels import group_norm_silu, group_norm_silu_reference, qkv_attention, qkv_attention_reference  # noqa: E402

# From the 64 px and 256 px IDDPM UNets (bf16). "ss" = scale-shift + SiLU, "silu" = norm + SiLU, "plain" = norm only.
GN_SHAPES = [((64, 128, 64, 64), "silu"), ((64, 256, 32, 32), "ss"), ((64, 384, 16, 16), "plain"), ((64, 512, 8, 8), "ss"),
             ((8, 256, 256, 256), "silu"), ((8, 1024, 16, 16), "ss")]
# (B, heads, T, D)
ATTN_SHAPES = [(64, 4, 256, 96), (64, 4, 64, 128), (64, 6, 1024, 64), (64, 9, 256, 64), (64, 12, 64, 64), (8, 8, 1024, 64)]
SMOKE_GN = [((2, 64, 4, 4), "ss"), ((1, 32, 9, 9), "silu")]
SMOKE_ATTN = [(1, 2, 20, 32)]


def eager_norm(x, w, b, groups, scale, shift, silu):
    """The UNet's unfused path: fp32 GroupNorm, cast back, then scale-shift and SiLU in x's dtype."""
    h = F.group_norm(x.float(), groups, w.float(), b.float(), 1e-5).type(x.dtype)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h) if silu else h


def sdpa_from_qkv(qkv, heads, backend):
    """SDPA as a drop-in from our [B, 3*H*D, T] layout, transposes included."""
    from torch.nn.attention import sdpa_kernel

    B, width, T = qkv.shape
    D = width // (3 * heads)
    q, k, v = qkv.view(B, heads, 3, D, T).permute(2, 0, 1, 4, 3).unbind(0)
    with sdpa_kernel(backend):
        o = F.scaled_dot_product_attention(q, k, v)
    return o.permute(0, 1, 3, 2).reshape(B, heads * D, T)


def timed(fn, reps=2):
    """Median ms per call, measured reps times (the spread shows the noise)."""
    if torch.cuda.is_available():
        return [do_bench(fn, return_mode="median") for _ in range(reps)]
    import time

    out = []
    for _ in range(reps):  # the interpreter has no device timer, and is slow: wall clock of one call
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def progress(row):
    """One line per measurement as it lands, so a run cut off by a time limit still leaves its numbers."""
    print(f"{row['op']} {row['shape']} {row.get('pattern', '')} {row['provider']}: fwd ms {row['fwd_ms']}, fwd+bwd ms {row['fwd_bwd_ms']}, "
          f"max rel err {row['max_rel_err']}", flush=True)


def fwd_bwd(fn, inputs, out_grad):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(out_grad)

    return run


def poison(device):
    if device.type == "cuda":  # freed at once: the caching allocator hands out NaN-filled blocks next
        torch.full((torch.cuda.mem_get_info()[0] // 8 // 4,), float("nan"), device=device)


def bench_group_norm(shapes, device, dtype, use_compile):
    rows = []
    compiled = torch.compile(eager_norm) if use_compile else None
    for shape, kind in shapes:
        B, C = shape[:2]
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
        scale = torch.randn(B, C, device=device, dtype=dtype, requires_grad=True) if kind == "ss" else None
        shift = torch.randn(B, C, device=device, dtype=dtype, requires_grad=True) if kind == "ss" else None
        silu = kind != "plain"
        inputs = [t for t in (x, w, b, scale, shift) if t is not None]
        dy = torch.randn_like(x)
        poison(device)
        y = group_norm_silu(x, w, b, 32, scale=scale, shift=shift, silu=silu)
        ref = group_norm_silu_reference(*(t.double() if t is not None else None for t in (x, w, b)), 32,
                                        scale=scale.double() if scale is not None else None, shift=shift.double() if shift is not None else None, silu=silu)
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        providers = {"triton": lambda: group_norm_silu(x, w, b, 32, scale=scale, shift=shift, silu=silu),
                     "eager": lambda: eager_norm(x, w, b, 32, scale, shift, silu)}
        if compiled is not None:
            providers["compile"] = lambda: compiled(x, w, b, 32, scale, shift, silu)
        n_bytes = x.numel() * x.element_size()
        for name, fn in providers.items():
            fwd = timed(lambda: fn())
            both = timed(fwd_bwd(fn, inputs, dy))
            rows.append({"op": "group_norm", "shape": list(shape), "pattern": kind, "provider": name, "fwd_ms": fwd, "fwd_bwd_ms": both,
                         "bwd_ms": [bb - ff for ff, bb in zip(fwd, both)], "fwd_bwd_GBps": 5 * n_bytes / (min(both) * 1e-3) / 1e9,
                         "max_rel_err": err if name == "triton" else None})
            progress(rows[-1])
    return rows


def bench_attention(shapes, device, dtype, smoke):
    rows = []
    for B, H, T, D in shapes:
        qkv = torch.randn(B, 3 * H * D, T, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(B, H * D, T, device=device, dtype=dtype)
        poison(device)
        out = qkv_attention(qkv, H)
        ref = qkv_attention_reference(qkv.double(), H)
        err = float((out.double() - ref).abs().max() / ref.abs().max())
        providers = {"triton": lambda: qkv_attention(qkv, H), "eager": lambda: qkv_attention_reference(qkv, H)}
        if device.type == "cuda" and not smoke:
            from torch.nn.attention import SDPBackend

            providers["sdpa_flash"] = lambda: sdpa_from_qkv(qkv, H, SDPBackend.FLASH_ATTENTION)
            providers["sdpa_mem_efficient"] = lambda: sdpa_from_qkv(qkv, H, SDPBackend.EFFICIENT_ATTENTION)
        flops_fwd = 4 * B * H * T * T * D
        for name, fn in providers.items():
            fwd = timed(lambda: fn())
            both = timed(fwd_bwd(fn, [qkv], dy))
            rows.append({"op": "attention", "shape": [B, H, T, D], "provider": name, "fwd_ms": fwd, "fwd_bwd_ms": both,
                         "bwd_ms": [bb - ff for ff, bb in zip(fwd, both)], "fwd_TFLOPs": flops_fwd / (min(fwd) * 1e-3) / 1e12,
                         "fwd_bwd_TFLOPs": 3.5 * flops_fwd / (min(both) * 1e-3) / 1e12, "max_rel_err": err if name == "triton" else None})
            progress(rows[-1])
    return rows


# Tile candidates for the attention sweep, (BLOCK_M, BLOCK_N, num_warps, num_stages); none spills on sm_90.
SWEEP = {"small_d": {"fwd": [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
                     "dkdv": [(32, 64, 4, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2)],
                     "dq": [(64, 64, 4, 3), (64, 128, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3)]},
         "large_d": {"fwd": [(64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2)],
                     "dkdv": [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2)],
                     "dq": [(64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)]}}


def sweep_attention(shapes, device, dtype):
    """For each shape and kernel, fwd+bwd ms with that kernel's tile replaced by each candidate (the others at their defaults)."""
    from kernels import attention_triton

    default_configs = attention_triton.configs
    rows = []
    for B, H, T, D in shapes:
        qkv = torch.randn(B, 3 * H * D, T, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(B, H * D, T, device=device, dtype=dtype)
        ref = qkv_attention_reference(qkv.detach().double(), H)
        for kernel, candidates in SWEEP["small_d" if D <= 64 else "large_d"].items():
            for cand in candidates:
                attention_triton.configs = lambda T_, D_, cap, _k=kernel, _c=cand: {**default_configs(T_, D_, cap), _k: attention_triton.LaunchConfig(*_c)}
                try:
                    err = float((qkv_attention(qkv, H).double() - ref).abs().max() / ref.abs().max())
                    ms = timed(fwd_bwd(lambda: qkv_attention(qkv, H), [qkv], dy))
                except Exception as e:  # a candidate that cannot build is a result too
                    err, ms = None, [f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"]
                finally:
                    attention_triton.configs = default_configs
                is_default = attention_triton.LaunchConfig(*cand) == default_configs(T, D, attention_triton.device_capability(qkv.device))[kernel]
                rows.append({"shape": [B, H, T, D], "kernel": kernel, "tile": list(cand), "default": is_default, "fwd_bwd_ms": ms, "max_rel_err": err})
                print(f"sweep {str([B, H, T, D]):<20} {kernel:<5} {str(cand):<18} {'*' if is_default else ' '} "
                      f"{min(ms) if err is not None else ms[0]}", flush=True)
    return rows


def copy_bandwidth(device, smoke):
    x = torch.empty((1 if smoke else 256) * 2**20 // 2, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = min(timed(lambda: y.copy_(x)))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def training_step(device, smoke):
    """images/s of one UNet training step (bf16 weights, AdamW) with kernels on vs off."""
    from iddpm_ds.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    flags = model_and_diffusion_defaults()  # 64 px, 128 channels, attention at 16 and 8
    batch = 32
    if smoke:
        flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4")
        batch = 2
    result = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**{**flags, "use_fused_kernels": fused})
        model.to(device=device, dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.rand(batch, 3, flags["image_size"], flags["image_size"], device=device) * 2 - 1

        def step():
            t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
            opt.zero_grad(set_to_none=True)
            diffusion.training_losses(model, x, t)["loss"].mean().backward()
            opt.step()

        ms = timed(step)
        result["kernels_on" if fused else "kernels_off"] = {"ms": ms, "images_per_s": batch / (min(ms) * 1e-3)}
        print(f"training step, kernels {'on' if fused else 'off'}: ms {ms}", flush=True)
    result["speedup"] = result["kernels_on"]["images_per_s"] / result["kernels_off"]["images_per_s"]
    result["config"] = {"image_size": flags["image_size"], "num_channels": flags["num_channels"], "batch": batch}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default="")
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--sweep", action="store_true", help="GPU: time the candidate tiles of each attention kernel instead")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench.py: no GPU; run with TRITON_INTERPRET=1 and --smoke to check the script on CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)", "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat(), "dtype": str(dtype)}
    if args.sweep:
        if device.type != "cuda":
            sys.exit("bench.py: --sweep needs a GPU")
        rows = sweep_attention(ATTN_SHAPES, device, dtype)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "sweep": rows}, f, indent=1)
        return
    copy_gbps = copy_bandwidth(device, args.smoke)
    rows = bench_group_norm(SMOKE_GN if args.smoke else GN_SHAPES, device, dtype, use_compile=not (args.smoke or args.no_compile))
    rows += bench_attention(SMOKE_ATTN if args.smoke else ATTN_SHAPES, device, dtype, args.smoke)
    step = training_step(device, args.smoke)
    for r in rows:
        if r["op"] == "group_norm":
            r["pct_of_copy"] = 100 * r["fwd_bwd_GBps"] / copy_gbps
        triton_row = next(q for q in rows if q["op"] == r["op"] and q["shape"] == r["shape"] and q["provider"] == "triton")
        r["triton_speedup_fwd_bwd"] = min(r["fwd_bwd_ms"]) / min(triton_row["fwd_bwd_ms"])
    report = {"meta": meta, "copy_GBps": copy_gbps, "rows": rows, "training_step": step}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} | {meta['dtype']} | copy {copy_gbps:.0f} GB/s")
    print(f"{'op':<10} {'shape':<22} {'pattern':<6} {'provider':<19} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'GB/s|TF/s':>10} {'%copy':>6} {'triton x':>8} {'err':>8}")
    for r in rows:
        rate = r.get("fwd_bwd_GBps", r.get("fwd_bwd_TFLOPs"))
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        print(f"{r['op']:<10} {str(r['shape']):<22} {r.get('pattern', ''):<6} {r['provider']:<19} {min(r['fwd_ms']):>9.3f} {min(r['bwd_ms']):>9.3f} "
              f"{min(r['fwd_bwd_ms']):>9.3f} {rate:>10.1f} {r.get('pct_of_copy', math.nan):>6.1f} {r['triton_speedup_fwd_bwd']:>8.2f} {err:>8}")
    print(f"training step {step['config']}: kernels off {step['kernels_off']['images_per_s']:.1f} img/s, "
          f"on {step['kernels_on']['images_per_s']:.1f} img/s, speed-up {step['speedup']:.2f}x")


if __name__ == "__main__":
    main()
