"""Our trainer beside improved-diffusion's own image_train.py: the same flags, the same digits, the mse curve.

    python benchmarks/parity_curve.py --improved_diffusion DIR [--runs 3] [--steps 400]

DIR is a checkout of openai/improved-diffusion (its scripts/ and improved_diffusion/; it needs
blobfile and mpi4py). Both trainers get improved-diffusion's small 32 px model (64 channels, 2 res
blocks, attention at 16 and 8, learn_sigma, cosine schedule, 1000 steps), batch 16, lr 1e-4
annealed to 0 over --steps, fp32, one process, on the built-in MNIST's digits written out as a PNG
folder. Ours runs with a DeepSpeed JSON that says nothing about clipping or precision (ZeRO-0),
so DeepSpeed's defaults are what is tested. Writes benchmarks/parity_curve.{json,md,png}.
"""

import argparse
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from iddpm_ds.image_datasets import open_source

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODEL_FLAGS = (
    "--image_size 32 --num_channels 64 --num_res_blocks 2 --attention_resolutions 16,8 --learn_sigma True "
    "--noise_schedule cosine --diffusion_steps 1000"
).split()


def run_flags(data: str, steps: int) -> list:
    """The flags both trainers take alike: data, model, steps, logging every 10 steps, no checkpoint."""
    steps_flags = [
        "--lr_anneal_steps",
        str(steps),
        "--log_interval",
        "10",
        "--save_interval",
        str(10 * steps),
    ]
    return ["--data_dir", data, *MODEL_FLAGS, *steps_flags]


def write_digits(folder: str) -> int:
    """The built-in MNIST as PNG files named LABEL_INDEX.png (improved-diffusion's class naming)."""
    source = open_source("builtin:mnist")
    os.makedirs(folder, exist_ok=True)
    for i in range(len(source)):
        source.image(i).save(os.path.join(folder, f"{source.label(i)}_{i:05d}.png"))
    return len(source)


def run_theirs(code_dir: str, data: str, out: str, steps: int, seed: int) -> list:
    env = dict(os.environ, OPENAI_LOGDIR=out, PYTHONPATH=code_dir, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    # Their script has no seed flag; a different process start gives a different run.
    script = os.path.join(code_dir, "scripts", "image_train.py")
    cmd = [sys.executable, script, *run_flags(data, steps), "--batch_size", "16", "--lr", "1e-4"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_theirs(out)


def read_theirs(out: str) -> list:
    """(step, mse, grad_norm) of each record of improved-diffusion's progress.csv in out."""
    with open(os.path.join(out, "progress.csv")) as f:
        return [
            (int(float(r["step"])), float(r["mse"]), float(r["grad_norm"]))
            for r in csv.DictReader(f)
            if r["mse"]
        ]


def run_ours(data: str, out: str, steps: int, seed: int, precision: str = "fp32") -> list:
    config = os.path.join(out, f"zero0_{precision}.json")
    os.makedirs(out, exist_ok=True)
    with open(config, "w") as f:
        json.dump(
            {
                "train_micro_batch_size_per_gpu": 16,
                "zero_optimization": {"stage": 0},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                "bf16": {"enabled": precision == "bf16"},
            },
            f,
        )
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    script = os.path.join(REPO, "launch", "train.py")
    seed_and_log = ["--seed", str(seed), "--log_dir", os.path.join(out, "run")]
    cmd = [sys.executable, script, "--deepspeed_config", config, *run_flags(data, steps), *seed_and_log]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_ours(out)


def read_ours(out: str) -> list:
    """(step, mse, grad_norm) of each record of our progress.jsonl under out."""
    with open(os.path.join(out, "run", "progress.jsonl")) as f:
        return [(r["step"], r["mse"], r.get("grad_norm")) for r in map(json.loads, f)]


def late_window(steps: int) -> tuple:
    """The steps whose logged mse is compared: 300-390 of 400, the same fractions of other lengths."""
    return round(0.75 * steps), round(0.975 * steps)


def late_mse(curve: list, steps: int) -> float:
    """Mean mse of the records logged inside late_window(steps)."""
    lo, hi = late_window(steps)
    return float(np.mean([mse for step, mse, _ in curve if lo <= step <= hi]))


def plot(curves: dict, path: str) -> None:
    """Both trainers' mse against step, one line per run, drawn with PIL (no plotting dependency)."""
    width, height, pad = 800, 480, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    points = [(s, m) for runs in curves.values() for curve in runs for s, m, _ in curve]
    max_step = max(s for s, _ in points)
    lo, hi = 0.0, min(0.5, max(m for _, m in points))

    def xy(step, mse):
        return (
            pad + (width - 2 * pad) * step / max_step,
            height - pad - (height - 2 * pad) * (min(mse, hi) - lo) / (hi - lo),
        )

    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for tick in np.linspace(lo, hi, 6):
        draw.text((5, xy(0, tick)[1] - 6), f"{tick:.2f}", fill="black")
    for step in range(0, max_step + 1, 100):
        draw.text((xy(step, lo)[0] - 10, height - pad + 5), str(step), fill="black")
    palette = [(200, 60, 40), (40, 90, 200), (30, 150, 60)]
    for i, (name, runs) in enumerate(curves.items()):
        for curve in runs:
            draw.line([xy(s, m) for s, m, _ in curve], fill=palette[i], width=2)
        draw.text((pad + 10, pad + 10 + 15 * i), f"{name} ({len(runs)} runs)", fill=palette[i])
    draw.text((width // 2 - 60, 15), "training mse against step", fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--improved_diffusion", required=True, help="a checkout of openai/improved-diffusion")
    parser.add_argument("--runs", type=int, default=3, help="runs of each trainer (default 3)")
    parser.add_argument(
        "--steps", type=int, default=400, help="optimizer steps; lr anneals to 0 over them (default 400)"
    )
    parser.add_argument(
        "--out", default=HERE, help="where parity_curve.{json,md,png} go (default benchmarks/)"
    )
    parser.add_argument(
        "--reuse",
        default="",
        help="report the finished runs in an earlier invocation's work folder, train none",
    )
    args = parser.parse_args()
    curves, seconds = {"improved-diffusion": [], "iddpm_ds": []}, {"improved-diffusion": [], "iddpm_ds": []}
    if args.reuse:  # a run cut short by a time limit still leaves its finished trainings
        read = {"improved-diffusion": read_theirs, "iddpm_ds": read_ours}
        for name in curves:
            run = 0
            while os.path.isfile(os.path.join(args.reuse, f"{name}_{run}", "DONE")):
                curves[name].append(read[name](os.path.join(args.reuse, f"{name}_{run}")))
                seconds[name].append(float(open(os.path.join(args.reuse, f"{name}_{run}", "DONE")).read()))
                run += 1
        write_report(
            curves, seconds, args.steps, len(os.listdir(os.path.join(args.reuse, "digits"))), args.out
        )
        return
    work = tempfile.mkdtemp(prefix="parity_")
    print(f"work folder {work} (--reuse it if this run is cut short)", flush=True)
    data = os.path.join(work, "digits")
    num_images = write_digits(data)
    for run in range(args.runs):
        for name in curves:
            start = time.perf_counter()
            out = os.path.join(work, f"{name}_{run}")
            if name == "iddpm_ds":
                curves[name].append(run_ours(data, out, args.steps, seed=run))
            else:
                curves[name].append(run_theirs(args.improved_diffusion, data, out, args.steps, seed=run))
            seconds[name].append(time.perf_counter() - start)
            with open(os.path.join(out, "DONE"), "w") as f:
                f.write(str(seconds[name][-1]))
            print(
                f"{name} run {run}: late mse {late_mse(curves[name][-1], args.steps):.4f} "
                f"({seconds[name][-1]:.0f} s)",
                flush=True,
            )
    write_report(curves, seconds, args.steps, num_images, args.out)


def cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # /proc/cpuinfo names the model on Linux
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    return cpu


def write_report(curves: dict, seconds: dict, steps: int, num_images: int, out_dir: str) -> None:
    """parity_curve.{json,png,md} in out_dir from each trainer's runs."""
    cpu = cpu_name()
    LATE = late_window(steps)
    late = {name: [late_mse(c, steps) for c in runs] for name, runs in curves.items()}
    report = {
        "cpu": cpu,
        "threads": os.cpu_count(),
        "images": num_images,
        "steps": steps,
        "late_window": LATE,
        "late_mse": late,
        "seconds": seconds,
        "curves": curves,
    }
    with open(os.path.join(out_dir, "parity_curve.json"), "w") as f:
        json.dump(report, f)
    plot(curves, os.path.join(out_dir, "parity_curve.png"))
    band = (min(late["improved-diffusion"]), max(late["improved-diffusion"]))
    inside = [band[0] <= v <= band[1] for v in late["iddpm_ds"]]
    ours, theirs = len(curves["iddpm_ds"]), len(curves["improved-diffusion"])
    lines = [
        "# Learning curve beside improved-diffusion",
        "",
        f"`python benchmarks/parity_curve.py --improved_diffusion DIR --steps {steps}` ({ours} finished runs"
        f" of ours, {theirs} of improved-diffusion's) on {cpu} ({os.cpu_count()} threads): {num_images}"
        " built-in MNIST digits as a PNG folder, improved-diffusion's 32 px config (64 channels, 2 res"
        " blocks, attention 16,8, learn_sigma, cosine, 1000 steps), batch 16, lr 1e-4 annealed to 0 over"
        f" {steps} steps, fp32, one process. Ours: a ZeRO-0 JSON silent on clipping.",
        "",
        f"| trainer | mean mse, steps {LATE[0]}-{LATE[1]}, per run | seconds per run |",
        "|---|---|---|",
    ]
    for name in curves:
        lines.append(
            f"| {name} | {', '.join(f'{v:.4f}' for v in late[name])} | "
            f"{', '.join(f'{s:.0f}' for s in seconds[name])} |"
        )
    mean = float(np.mean(late["iddpm_ds"]))
    lines += [
        "",
        f"improved-diffusion's run-to-run band: {band[0]:.4f} to {band[1]:.4f}. Our mean, {mean:.4f} "
        f"(against {np.mean(late['improved-diffusion']):.4f}), is "
        f"{'inside' if band[0] <= mean <= band[1] else 'outside'} it; {sum(inside)} of {len(inside)} of our"
        " runs are. Curves: parity_curve.png. Seconds are wall time on a machine that may have run other"
        " jobs beside a run: compare speed only across runs made under the same load.",
    ]
    with open(os.path.join(out_dir, "parity_curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
