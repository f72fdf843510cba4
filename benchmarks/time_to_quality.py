"""Sample quality against minutes of training on this machine: improved-diffusion's own trainer and sampler
against ours (the recipe below), side by side, and each of our techniques switched off alone.

    python benchmarks/time_to_quality.py --improved_diffusion DIR [--minutes 1,2,4,8] [--samples 500]
    python benchmarks/time_to_quality.py --reuse_theirs EARLIER.json [...]   # ours only

Both sides train on the built-in 5,000 digits written out as a PNG folder (improved-diffusion's class
naming), class-conditional, the demo's model flags, 2 threads in all, the wall clock counted from each
command's start (set-up included, as a user waits for it), run one after the other, alone. A snapshot of
the weights is kept as training goes (theirs: its checkpoints every --their_save steps; ours: the post-hoc
EMA profile's snapshots); at each time point the newest snapshot written by then is sampled.

- improved-diffusion: scripts/image_train.py with its defaults (lr 1e-4, fp32, EMA 0.9999, uniform
  timesteps, linear schedule), --batch_size 32 as ours, its 32 px UNet (channel_mult 1,2,2,2) as ours.
  Sampled with its own p_sample_loop at 100 respaced steps, labels 0-9 cycled (its image_sample.py would
  draw labels from 1,000 ImageNet classes), from its EMA and from its raw weights.
- ours: launch/train.py with the README demo's recipe but for its lr annealing (a run stopped by the clock
  cannot anneal to its end; benchmarks/demo_recipe.md measures that at a fixed step count): 2 CPU ranks,
  bf16 where native, x_0 prediction, cosine schedule, the high-noise timestep density, constant lr 1e-3,
  the post-hoc EMA profile of width PROFILE; sampled as the README demo samples: ancestral at 50 respaced
  steps, guidance --guidance where the noise level sigma lies in (0.3, 5].
- ablations at --ablation_minutes (0: none): ours with eps prediction, with Min-SNR 5, in fp32, with
  uniform timesteps, with the linear schedule; and at the end of the full run the fixed EMA (--ema_rate
  0.995) against the profile, and improved-diffusion's sampler settings (ancestral, 100 steps) against ours.

--reuse_theirs FILE takes improved-diffusion's rows from an earlier run's OUT.json (same machine, same
--samples) instead of training it again; the output says so.

Each sample set is scored by class accuracy, mnist_fd beside the real-data floor at the same count and the
colour measure. Writes OUT.json and OUT.png (mnist_fd against minutes); time_to_quality.md reads the recorded
run.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from parity_curve import cpu_name, write_digits  # noqa: E402
from sampling import sample_all  # noqa: E402

from iddpm_ds.evaluation import Evaluator  # noqa: E402
from iddpm_ds.flags import load_trained_model, read_run_config  # noqa: E402
from iddpm_ds.sampling import classifier_free_guidance, fast_model, noise_level  # noqa: E402
from iddpm_ds.script_util import NULL_CLASS  # noqa: E402

MODEL = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8 --class_cond True".split()
)
PROFILE = "0.1"  # the post-hoc EMA width tracked and sampled, as in the README demo
OURS = (
    "--deepspeed_config ds_configs/cpu_bf16_auto.json --class_dropout_prob 0.1 --predict_xstart True "
    "--noise_schedule cosine --schedule_sampler high-noise --lr 1e-3 --ema_rate 0.995 "
    f"--ema_profiles {PROFILE} --ema_snapshot_interval 25 --save_interval 1000000 --log_interval 100 "
    "--max_steps 1000000"
).split()
INTERVAL = (0.3, 5.0)  # our guidance's noise-level interval, as in the README demo
ABLATIONS = {
    "eps prediction": ["--predict_xstart", "False"],
    "Min-SNR 5": ["--snr_gamma", "5"],
    "fp32": ["--deepspeed_config", "ds_configs/cpu.json"],
    "uniform timesteps": ["--schedule_sampler", "uniform"],
    "linear schedule": ["--noise_schedule", "linear"],
}


def train_for(cmd, env, seconds: float, out_dir: str) -> float:
    """Run a training command for `seconds` of wall clock, then stop it (SIGTERM: ours checkpoints); returns
    the start time. Its output goes to out_dir/train.log."""
    start = time.time()
    with open(os.path.join(out_dir, "train.log"), "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
    return start


def newest_by(files, start: float, minutes: float):
    """The newest of files (path, step) written within `minutes` of start, or None."""
    done = [(step, path) for path, step in files if os.path.getmtime(path) <= start + 60 * minutes]
    return max(done)[1] if done else None


def run_theirs(args, data, work, evaluator, labels) -> dict:
    out = os.path.join(work, "theirs")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OPENAI_LOGDIR=out, PYTHONPATH=args.improved_diffusion, OMP_NUM_THREADS="2")
    script = os.path.join(args.improved_diffusion, "scripts", "image_train.py")
    cmd = [sys.executable, script, "--data_dir", data, *MODEL, "--batch_size", "32"]
    cmd += ["--save_interval", str(args.their_save), "--log_interval", "100"]
    start = train_for(cmd, env, 60 * max(args.minutes) + 5, out)
    sys.path.insert(0, args.improved_diffusion)
    from improved_diffusion import script_util as theirs

    flags = theirs.model_and_diffusion_defaults()
    flags.update(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="8", class_cond=True)
    flags["timestep_respacing"] = "100"
    model, diffusion = theirs.create_model_and_diffusion(**flags)
    model.eval()
    rows = []
    # Its EMA (0.9999) has barely left the initial weights in these minutes: sampled at the last point only.
    for kind, prefix, points in (
        ("raw weights", "model", args.minutes),
        ("EMA 0.9999", "ema_0.9999_", args.minutes[-1:]),
    ):
        files = [
            (os.path.join(out, f), int(f[len(prefix) : -3]))
            for f in os.listdir(out)
            if f.startswith(prefix) and f.endswith(".pt")
        ]
        for minutes in points:
            path = newest_by(files, start, minutes)
            if path is None:
                continue
            model.load_state_dict(torch.load(path, map_location="cpu"))
            t0 = time.perf_counter()
            images = []
            for i in range(0, len(labels), 250):
                y = torch.from_numpy(labels[i : i + 250])
                torch.manual_seed(i)
                with torch.no_grad():
                    x = diffusion.p_sample_loop(model, (len(y), 3, 32, 32), model_kwargs={"y": y})
                images.append(
                    ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
                )
            row = {
                "side": "improved-diffusion",
                "weights": kind,
                "minutes": minutes,
                "checkpoint": os.path.basename(path),
            }
            row.update(evaluator(np.concatenate(images), labels), sample_seconds=time.perf_counter() - t0)
            print(row, flush=True)
            rows.append(row)
    return {"rows": rows}


def ours_images(run: str, path: str, labels, guidance: float, sampler: str = "ancestral", steps: int = 50):
    """Sampled as the README demo samples (its best cell in sampling.md): guidance in INTERVAL."""
    flags = dict(read_run_config(run)["model_flags"], timestep_respacing=str(steps))
    model, diffusion = load_trained_model(path, flags, False, torch.device("cpu"))
    net = fast_model(model, "auto")
    if guidance != 1.0:
        net = classifier_free_guidance(
            net, guidance, NULL_CLASS, interval=INTERVAL, sigma=noise_level(diffusion)
        )
    return sample_all(net, diffusion, labels, sampler, 250)


def run_ours(args, data, work, name, extra, minutes_list, evaluator, labels) -> list:
    out = os.path.join(work, name.replace(" ", "_"))
    os.makedirs(out, exist_ok=True)
    run = os.path.join(out, "run")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "launch/train.py",
        "--log_dir",
        run,
        "--data_dir",
        data,
        *MODEL,
        *OURS,
    ]
    start = train_for(cmd + extra, env, 60 * max(minutes_list) + 5, out)
    snaps = [
        (os.path.join(run, f), int(f.rsplit("_", 1)[1][:-3]))
        for f in os.listdir(run)
        if f.startswith(f"phema_{PROFILE}_")
    ]
    rows = []
    for minutes in minutes_list:
        path = newest_by(snaps, start, minutes)
        if path is None:
            continue
        row = {"side": "ours", "variant": name, "minutes": minutes, "checkpoint": os.path.basename(path)}
        row.update(evaluator(ours_images(run, path, labels, args.guidance), labels))
        print(row, flush=True)
        rows.append(row)
    # At the end of the full run, unless ablations are off: the fixed EMA, and improved-diffusion's sampler.
    if name == "full" and args.ablation_minutes:
        step = max(s for _, s in snaps)
        ema = [f for f in os.listdir(run) if f.startswith("ema_0.995_")]
        if ema:
            row = {
                "side": "ours",
                "variant": "full, fixed EMA 0.995",
                "minutes": "end",
                "checkpoint": ema[-1],
            }
            row.update(evaluator(ours_images(run, os.path.join(run, ema[-1]), labels, args.guidance), labels))
            rows.append(row)
        last = os.path.join(run, f"phema_{PROFILE}_{step:06d}.pt")
        row = {
            "side": "ours",
            "variant": "full, ancestral 100 steps",
            "minutes": "end",
            "checkpoint": os.path.basename(last),
        }
        row.update(evaluator(ours_images(run, last, labels, args.guidance, "ancestral", 100), labels))
        rows.append(row)
        for r in rows[-2:]:
            print(r, flush=True)
    return rows


def plot(results, path) -> None:
    width, height, pad = 700, 420, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    series = {}
    # Rows kept from another run were trained at another hour, and this machine's speed varies by hour.
    theirs_from = results["meta"].get("theirs_from")
    reused = f", reused from a run of {theirs_from['date']}" if theirs_from else ""
    for r in results["rows"]:
        if isinstance(r["minutes"], (int, float)):
            key = r.get("variant") or f"improved-diffusion ({r['weights']}){reused}"
            series.setdefault(key, []).append((r["minutes"], r["mnist_fd"]))
    top = max(fd for pts in series.values() for _, fd in pts) * 1.05
    right = max(m for pts in series.values() for m, _ in pts)

    def xy(m, fd):
        return pad + (width - 2 * pad) * m / right, height - pad - (height - 2 * pad) * fd / top

    draw.line([(pad, height - pad), (width - pad, height - pad)], fill="black")
    draw.line([(pad, pad), (pad, height - pad)], fill="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (key, pts) in enumerate(sorted(series.items())):
        pts, colour = sorted(pts), colours[i % len(colours)]
        draw.line([xy(*p) for p in pts], fill=colour, width=2)
        for x, y in (xy(*p) for p in pts):  # a variant measured at one time point is a dot
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((pad + 10, pad + 14 * i), key, fill=colour)
    draw.text((width // 2 - 60, height - pad + 15), "minutes of training", fill="black")
    draw.text((5, pad - 20), f"mnist_fd (0 .. {top:.0f})", fill="black")
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--improved_diffusion", default="", help="a checkout of openai/improved-diffusion")
    p.add_argument("--minutes", default="1,2,4,8")
    p.add_argument("--ablation_minutes", type=float, default=4, help="0: no ablations")
    p.add_argument(
        "--reuse_theirs", default="", help="an earlier OUT.json whose improved-diffusion rows to keep"
    )
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--guidance", type=float, default=2.0, help="our classifier-free guidance scale")
    p.add_argument("--their_save", type=int, default=50, help="improved-diffusion's save_interval (steps)")
    p.add_argument("--out", default=os.path.join(HERE, "time_to_quality"))
    args = p.parse_args()
    args.minutes = [float(m) for m in args.minutes.split(",")]
    if not (args.improved_diffusion or args.reuse_theirs):
        p.error("give --improved_diffusion DIR, or --reuse_theirs FILE to keep an earlier run's rows")
    labels = np.arange(args.samples) % 10
    evaluator = Evaluator(["mnist_acc", "mnist_fd", "colour"], "builtin:mnist", 32)
    results = {"meta": {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "samples": args.samples,
                        "guidance": args.guidance, "minutes": args.minutes}, "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "digits")
        write_digits(data)
        if args.reuse_theirs:
            with open(args.reuse_theirs) as f:
                earlier = json.load(f)
            if earlier["meta"]["samples"] != args.samples:
                sys.exit(
                    f"{args.reuse_theirs} scored {earlier['meta']['samples']} samples, not {args.samples}"
                )
            results["meta"]["theirs_from"] = {"file": args.reuse_theirs, **earlier["meta"]}
            results["rows"] += [r for r in earlier["rows"] if r["side"] == "improved-diffusion"]
        else:
            results["rows"] += run_theirs(args, data, work, evaluator, labels)["rows"]
        results["rows"] += run_ours(args, data, work, "full", [], args.minutes, evaluator, labels)
        for name, extra in ABLATIONS.items() if args.ablation_minutes else ():
            results["rows"] += run_ours(
                args, data, work, name, extra, [args.ablation_minutes], evaluator, labels
            )
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out + ".png")


if __name__ == "__main__":
    main()
