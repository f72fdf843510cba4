"""What the engine runs of benchmarks/gpu_check.sh measured, read from their run directories.

    python benchmarks/gpu_engine_summary.py RUNS_DIR [--out engine.json]

RUNS_DIR holds one run directory per (precision, kernels) of launch/train.py; the first of them was also
resumed and sampled from. For each: images/s (median over the steps after the first WARMUP, which hold the
kernels' compilation and self-checks), peak GPU memory, first and last loss, the loss-scale trajectory of an
fp16 run (every change, and whether it settled: no overflow in the last SETTLED steps), skipped steps, and the
kernels' self-check lines from its log. Then the speed-up of the kernels per precision, and the resume.
"""

import argparse
import json
import os
import statistics
from typing import Dict, List

WARMUP, SETTLED = 5, 10


def records(run: str) -> List[Dict]:
    with open(os.path.join(run, "progress.jsonl")) as f:
        return [r for r in map(json.loads, f) if "images_per_s" in r]


def summarise(run: str) -> Dict:
    rows = records(run)
    with open(os.path.join(run, "log.txt")) as f:
        log = f.read().splitlines()
    steady = [r["images_per_s"] for r in rows if r["step"] > WARMUP] or [r["images_per_s"] for r in rows]
    out = {
        "steps": rows[-1]["step"],
        "images_per_s": statistics.median(steady),
        "max_memory_gb": max((r.get("max_memory_gb", 0.0) for r in rows), default=0.0),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "skipped_steps": rows[-1]["skipped_steps"],
        "self_check": [
            line.split("kernel self-check ", 1)[1] for line in log if "kernel self-check " in line
        ],
        "resumed": [line.split(" ", 2)[-1] for line in log if "resumed from" in line],
    }
    scales = [(r["step"], r["loss_scale"]) for r in rows if "loss_scale" in r]
    if scales:
        out["loss_scale"] = [s for i, s in enumerate(scales) if i == 0 or s[1] != scales[i - 1][1]]
        last_change = out["loss_scale"][-1][0]
        out["loss_scale_settled"] = rows[-1]["step"] - last_change >= SETTLED
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="the folder of run directories")
    p.add_argument("--out", default="", help="write the summary as JSON")
    args = p.parse_args()
    runs = {
        name: summarise(os.path.join(args.runs, name))
        for name in sorted(os.listdir(args.runs))
        if os.path.isfile(os.path.join(args.runs, name, "progress.jsonl"))
    }
    for name, r in runs.items():
        print(
            f"{name}: {r['steps']} steps, {r['images_per_s']:.1f} img/s, peak {r['max_memory_gb']:.1f} GB, "
            f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, skipped steps {r['skipped_steps']}"
        )
        if "loss_scale" in r:
            trajectory = ", ".join(f"step {s}: {v:g}" for s, v in r["loss_scale"])
            print(f"  loss scale: {trajectory} ({'settled' if r['loss_scale_settled'] else 'NOT settled'})")
        for line in r["self_check"]:
            print(f"  self-check {line}")
        for line in r["resumed"]:
            print(f"  {line}")
    speedups = {}
    for precision in sorted({name.rsplit("_", 1)[0] for name in runs}):
        on, off = runs.get(f"{precision}_kernels"), runs.get(f"{precision}_reference")
        if on and off:
            speedups[precision] = on["images_per_s"] / off["images_per_s"]
            print(f"{precision}: kernels on {speedups[precision]:.2f}x the step with them off")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "kernel_speedup": speedups}, f, indent=1)


if __name__ == "__main__":
    main()
