"""Sample quality of a training run by step and by guidance scale, through the user's own commands
(launch/sample.py, then launch/evaluate.py --metrics mnist_acc,mnist_fd) on its saved checkpoints.

    python benchmarks/quality.py --run_dir runs/demo --steps 250,500,1000 --guidance 1,2,3,5 \\
        --table_step 1000 --num_samples 200

Writes benchmarks/quality.json and benchmarks/quality.md: class accuracy (the project's digit classifier
on the label each sample was drawn for) and the Fréchet distance in its feature space against the
training digits, for each guidance scale at --table_step and for each step at --by_step_guidance.
Every cell samples the same seeds and labels; cells already measured in RUN_DIR/quality are reused.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(run_dir: str, step: int, guidance: float, num_samples: int, respacing: str, work: str) -> dict:
    out = os.path.join(work, f"step{step}_w{guidance:g}.npz")
    row_file = out[: -len(".npz")] + ".row.json"
    if os.path.isfile(row_file):  # measured by an earlier, interrupted run of this benchmark
        with open(row_file) as f:
            return json.load(f)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "sample.py"),
            "--run_dir",
            run_dir,
            "--model_path",
            os.path.join(run_dir, "checkpoints", f"step{step:06d}"),
            "--num_samples",
            str(num_samples),
            "--batch_size",
            str(min(num_samples, 100)),
            "--timestep_respacing",
            respacing,
            "--guidance_scale",
            str(guidance),
            "--out",
            out,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sampled = time.perf_counter() - start
    metrics_file = out[: -len(".npz")] + ".json"
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "evaluate.py"),
            "--samples",
            out,
            "--metrics",
            "mnist_acc,mnist_fd",
            "--out",
            metrics_file,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(metrics_file) as f:
        result = json.load(f)
    row = {
        "step": step,
        "guidance_scale": guidance,
        "num_samples": num_samples,
        "respacing": respacing,
        "mnist_acc": result["mnist_acc"],
        "mnist_fd": result["mnist_fd"],
        "sample_seconds": round(sampled, 1),
    }
    with open(row_file, "w") as f:
        json.dump(row, f)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--steps", default="250,500,1000")
    parser.add_argument("--guidance", default="1,2,3,5")
    parser.add_argument("--table_step", type=int, default=1000)
    parser.add_argument("--by_step_guidance", type=float, default=5.0)
    parser.add_argument("--num_samples", type=int, default=200)
    parser.add_argument("--respacing", default="ddim50")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "quality"))
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    scales = [float(w) for w in args.guidance.split(",")]
    by_step_scale = args.by_step_guidance
    work = os.path.join(args.run_dir, "quality")
    os.makedirs(work, exist_ok=True)

    rows = [measure(args.run_dir, args.table_step, w, args.num_samples, args.respacing, work) for w in scales]
    for step in steps:
        if step != args.table_step:
            rows.append(measure(args.run_dir, step, by_step_scale, args.num_samples, args.respacing, work))
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = json.load(f)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    report = {"cpu": cpu, "run_dir": args.run_dir, "model_flags": config["model_flags"], "rows": rows}
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)

    lines = [
        "# Sample quality of the README demo run",
        "",
        f"Measured by `benchmarks/quality.py` on {cpu}; {args.num_samples} samples per cell "
        f"({args.respacing}, the same seeds and labels 0-9 cycled), scored by the project's digit classifier "
        "(`iddpm_ds/digit_classifier.py`).",
        "",
        "The run: "
        + ", ".join(
            f"{k} {config['model_flags'][k]}"
            for k in (
                "image_size",
                "num_channels",
                "num_res_blocks",
                "channel_mult",
                "attention_resolutions",
                "class_cond",
                "class_dropout_prob",
            )
        )
        + f"; lr {config['train_flags']['lr']}, EMA {config['train_flags']['ema_rate']}, "
        f"{config['world_size']} ranks x {config['deepspeed']['train_micro_batch_size_per_gpu']} images, "
        f"{config['precision']}. (With a constant lr, a checkpoint at step N is the same whatever "
        "--max_steps the run was given.)",
        "",
        f"## Guidance scale at step {args.table_step}",
        "",
        "| guidance w | class accuracy | feature FD |",
        "|---|---|---|",
    ]
    for r in rows[: len(scales)]:
        lines.append(f"| {r['guidance_scale']:g} | {100 * r['mnist_acc']:.1f}% | {r['mnist_fd']:.1f} |")
    lines += [
        "",
        f"## By training step (w = {by_step_scale:g})",
        "",
        "| step | class accuracy | feature FD |",
        "|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["guidance_scale"] == by_step_scale), key=lambda r: r["step"]):
        lines.append(f"| {r['step']} | {100 * r['mnist_acc']:.1f}% | {r['mnist_fd']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
