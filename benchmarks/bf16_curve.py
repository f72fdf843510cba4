"""Does bf16 learn like fp32? Our trainer in bf16 on parity_curve.py's runs: same flags, digits and steps.

    python benchmarks/bf16_curve.py [--runs 3] [--steps 400]

The fp32 side is benchmarks/parity_curve.json (improved-diffusion's and our fp32 runs on the same task):
their spread is fp32's run-to-run noise. This script adds --runs bf16 runs of ours (DeepSpeed's bf16:
bf16 weights and activations, fp32 master weights and optimizer) and writes benchmarks/bf16_curve.{json,
md,png}. bf16 learns like fp32 when its late mse lies inside that noise.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from parity_curve import HERE, cpu_name, late_mse, late_window, plot, run_ours, write_digits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--runs", type=int, default=3, help="bf16 runs (default 3)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps, as parity_curve.json's")
    args = parser.parse_args()
    with open(os.path.join(HERE, "parity_curve.json")) as f:
        fp32 = json.load(f)
    if fp32["steps"] != args.steps:
        raise SystemExit(f"bf16_curve.py: parity_curve.json has {fp32['steps']}-step runs; pass --steps that")
    work = tempfile.mkdtemp(prefix="bf16_curve_")
    data = os.path.join(work, "digits")
    write_digits(data)
    curves, seconds = [], []
    for run in range(args.runs):
        start = time.perf_counter()
        curves.append(
            run_ours(data, os.path.join(work, f"bf16_{run}"), args.steps, seed=run, precision="bf16")
        )
        seconds.append(time.perf_counter() - start)
        print(
            f"bf16 run {run}: late mse {late_mse(curves[-1], args.steps):.4f} ({seconds[-1]:.0f} s)",
            flush=True,
        )

    fp32_late = [v for runs in fp32["late_mse"].values() for v in runs]
    bf16_late = [late_mse(c, args.steps) for c in curves]
    band = (min(fp32_late), max(fp32_late))
    report = {
        "cpu": cpu_name(),
        "steps": args.steps,
        "fp32_late_mse": fp32["late_mse"],
        "bf16_late_mse": bf16_late,
    }
    report.update(bf16_seconds=seconds, bf16_curves=curves)
    with open(os.path.join(HERE, "bf16_curve.json"), "w") as f:
        json.dump(report, f)
    plot(
        {
            "fp32 (both trainers)": [c for runs in fp32["curves"].values() for c in runs],
            "iddpm_ds bf16": curves,
        },
        os.path.join(HERE, "bf16_curve.png"),
    )
    lo, hi = late_window(args.steps)
    mean = float(np.mean(bf16_late))

    def listed(values):
        return ", ".join(f"{v:.4f}" for v in values)

    lines = [
        "# bf16 against fp32: the learning curve",
        "",
        f"`python benchmarks/bf16_curve.py --steps {args.steps}` on {report['cpu']}: our trainer with a"
        " ZeRO-0 bf16 JSON (bf16 weights and activations, fp32 master weights, Adam and EMA) on"
        " parity_curve.md's task (improved-diffusion's 32 px config on the built-in digits, batch 16, lr"
        f" 1e-4 annealed over {args.steps} steps). fp32's run-to-run noise is parity_curve.json's fp32"
        " runs, both trainers.",
        "",
        f"| runs | mean mse, steps {lo}-{hi}, per run |",
        "|---|---|",
        f"| fp32, improved-diffusion | {listed(fp32['late_mse']['improved-diffusion'])} |",
        f"| fp32, iddpm_ds | {listed(fp32['late_mse']['iddpm_ds'])} |",
        f"| bf16, iddpm_ds | {listed(bf16_late)} |",
        "",
        f"fp32's band: {band[0]:.4f} to {band[1]:.4f} (mean {np.mean(fp32_late):.4f}). bf16's mean,"
        f" {mean:.4f}, is {'inside' if band[0] <= mean <= band[1] else 'outside'} it;"
        f" {sum(band[0] <= v <= band[1] for v in bf16_late)} of {len(bf16_late)} bf16 runs are."
        f" Curves: bf16_curve.png. bf16 seconds per run: {', '.join(f'{s:.0f}' for s in seconds)}.",
    ]
    with open(os.path.join(HERE, "bf16_curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
