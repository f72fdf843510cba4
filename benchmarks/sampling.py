"""Sampling: quality per sampler, step count, guidance scale and guidance interval, and speed against
improved-diffusion's own sampler, on a trained digits model (the README demo's recipe).

    python benchmarks/sampling.py quality --run RUN --steps 1000,3000 [--weights phema_0.05] [--samples 500]
        [--samplers ancestral:250,dpmpp_2m_sde:20] [--guidance 1,3] [--out OUT]
    python benchmarks/sampling.py speed --run RUN --step 1000 --improved_diffusion DIR [--out ...]

quality: for each trained step (its WEIGHTS_STEP.pt: a rate EMA, ema_0.995, or a post-hoc EMA profile,
phema_0.05), every cell of the samplers (by default ancestral at 250/100/50 steps, DDIM at 50/25 and
DPM-Solver++(2M) and its SDE variant at 10/15/20/25 model evaluations) at each guidance scale (by default 1,
2, 3 and 5), the guided ones with and without the guidance interval: --samples images (labels cycled 0-9,
image i from seed (0, i), so every cell starts from the same noise), scored by class accuracy, mnist_fd
beside the real-data floor at the same count (real digits scored as samples) and the colour measure
(evaluation.colour), and timed. Writes
OUT.json after every cell (a run cut short keeps what it measured; --reuse continues it), then OUT.md (the
table; its text from the "## Findings" heading on is kept across reruns) and OUT.png (a grid of the best
cell by mnist_fd among those at >= 98% class accuracy).

speed: images/s at equal model evaluations, in one process, alternating rounds: improved-diffusion's own
p_sample_loop (its UNet, fp32, eager, the model's weights loaded) against ours at the same number of model
evaluations, fp32 and with the fast paths (bf16 where the CPU has it natively, compiled; compile time
reported apart). With --compile, quality samples through one compiled UNet per trained step, compiled
before the first cell is timed (compile seconds in OUT.json's meta).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from iddpm_ds.evaluation import Evaluator
from iddpm_ds.flags import load_trained_model, read_run_config
from iddpm_ds.sampling import SAMPLERS as SAMPLER_NAMES
from iddpm_ds.sampling import classifier_free_guidance, fast_model, make_grid, noise_level, sample_images
from iddpm_ds.script_util import NULL_CLASS

SAMPLERS = "ancestral:250,ancestral:100,ancestral:50,ddim:50,ddim:25"
SAMPLERS += "".join(f",{s}:{n}" for s in ("dpmpp_2m", "dpmpp_2m_sde") for n in (10, 15, 20, 25))
GUIDANCE = "1,2,3,5"
FINDINGS = "## Findings"


def respacing(sampler: str, n: int) -> str:
    return f"ddim{n}" if sampler == "ddim" else str(n)


def load(run: str, step: int, sampler: str, n: int, weights: str = ""):
    """(model, diffusion, flags) of the run's weights file WEIGHTS_STEP.pt (by default its first-rate EMA),
    respaced for the sampler."""
    flags = dict(read_run_config(run)["model_flags"], timestep_respacing=respacing(sampler, n))
    weights = weights or "ema_" + str(read_run_config(run)["train_flags"]["ema_rate"]).split(",")[0]
    path = os.path.join(run, f"{weights}_{step:06d}.pt")
    model, diffusion = load_trained_model(path, flags, False, torch.device("cpu"))
    return model, diffusion, flags


def sample_all(net, diffusion, labels: np.ndarray, sampler: str, batch: int) -> np.ndarray:
    """uint8 [N, 32, 32, 3] for labels [N], image i from seed (0, i), in batches."""
    images = []
    for i in range(0, len(labels), batch):
        y = {"y": torch.from_numpy(labels[i : i + batch])}
        indices = list(range(i, min(i + batch, len(labels))))
        images.append(
            sample_images(net, diffusion, indices, 32, 0, y, sampler=sampler, device=torch.device("cpu"))
        )
    return np.concatenate(images)


def cell_key(step, sampler, n, w, interval) -> str:
    return f"{step}|{sampler}|{n}|{w:g}|{interval or ''}"


def quality(args) -> None:
    out_json = args.out + ".json"
    results = json.load(open(out_json)) if args.reuse and os.path.exists(out_json) else {"cells": {}}
    results["meta"] = {
        "run": args.run, "weights": args.weights, "samples": args.samples, "interval": args.interval,
        "precision": args.precision, "compiled": args.compile,
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": torch.get_num_threads(),
    }  # fmt: skip
    interval = tuple(float(x) for x in args.interval.split(","))
    labels = np.arange(args.samples) % 10
    evaluator = Evaluator(["mnist_acc", "mnist_fd", "colour"], "builtin:mnist", 32)
    for step in [int(s) for s in args.steps.split(",")]:
        # One UNet per trained step, shared by every cell (only the respaced process differs between cells),
        # so with --compile it compiles once per batch shape: the plain and the guided (doubled) batch.
        model, two_steps, _ = load(args.run, step, "ancestral", 2, args.weights)
        base = fast_model(model, args.precision, args.compile)
        if args.compile:  # two steps unguided and two guided compile both shapes before any cell is timed
            start = time.perf_counter()
            for net in (base, classifier_free_guidance(base, 2.0, NULL_CLASS)):
                sample_all(net, two_steps, labels[: args.batch], "ancestral", args.batch)
            results["meta"].setdefault("compile_s", {})[str(step)] = time.perf_counter() - start
        for w in [float(g) for g in args.guidance.split(",")]:
            for sampler, n in [(c.split(":")[0], int(c.split(":")[1])) for c in args.samplers.split(",")]:
                for iv in [None] if w == 1.0 else [None, interval]:
                    key = cell_key(step, sampler, n, w, iv)
                    if key in results["cells"]:
                        continue
                    _, diffusion, _ = load(args.run, step, sampler, n, args.weights)
                    net = base
                    if w != 1.0:
                        net = classifier_free_guidance(
                            net, w, NULL_CLASS, interval=iv, sigma=noise_level(diffusion)
                        )
                    start = time.perf_counter()
                    images = sample_all(net, diffusion, labels, sampler, args.batch)
                    seconds = time.perf_counter() - start
                    metrics = evaluator(images, labels)
                    results["cells"][key] = {
                        "step": step, "sampler": sampler, "nfe": n, "guidance": w, "interval": iv,
                        "seconds": seconds, **metrics,
                    }  # fmt: skip
                    print(
                        f"{key}: "
                        + " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                        + f" | {seconds:.0f} s"
                    )
                    with open(out_json + ".tmp", "w") as f:
                        json.dump(results, f, indent=1)
                    os.replace(out_json + ".tmp", out_json)
                    if key == best_key(results):
                        np.save(args.out + ".best.npy", images)
    write_markdown(results, args.out + ".md")
    best = best_key(results)
    if best and os.path.exists(args.out + ".best.npy"):
        from PIL import Image

        Image.fromarray(make_grid(np.load(args.out + ".best.npy")[:100])).save(args.out + ".png")
        os.remove(args.out + ".best.npy")


def best_key(results):
    """The cell with the lowest mnist_fd among those at >= 98% class accuracy (None if there is none)."""
    good = {k: c for k, c in results["cells"].items() if c["mnist_acc"] >= 0.98}
    return min(good, key=lambda k: good[k]["mnist_fd"]) if good else None


def write_markdown(results, path) -> None:
    meta = results["meta"]
    interval = meta["interval"].replace(",", " < sigma <= ")
    lines = [
        "# Sampling: quality per sampler, steps, guidance and guidance interval",
        "",
        f"`python benchmarks/sampling.py quality --run RUN --steps ...` on {meta['date']}, {meta['cpu']}, "
        f"{meta['threads']} threads, UNet in {meta['precision']}. {meta['samples']} samples per cell (labels "
        "0-9 cycled; image i from seed (0, i) in every cell), scored by the project's digit classifier: "
        "class accuracy, mnist_fd (its feature-space Frechet distance to the 5,000 training digits) beside "
        f"the floor of {meta['samples']} real digits scored the same way, and the colour measure (mean over "
        f"pixels of max - min across RGB / 255; real digits 0). Interval: guidance only where {interval}.",
        "",
        "| step | sampler | NFE | guidance | interval | class acc | mnist_fd | floor | colour | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted(
        results["cells"].values(),
        key=lambda c: (
            c["step"],
            c["guidance"],
            SAMPLER_NAMES.index(c["sampler"]),
            -c["nfe"],
            bool(c["interval"]),
        ),
    )
    for c in cells:
        iv = f"({c['interval'][0]:g}, {c['interval'][1]:g}]" if c["interval"] else "-"
        lines.append(
            f"| {c['step']} | {c['sampler']} | {c['nfe']} | {c['guidance']:g} | {iv} | "
            f"{c['mnist_acc']:.3f} | {c['mnist_fd']:.1f} | {c['mnist_fd_floor']:.1f} | {c['colour']:.3f} | "
            f"{c['seconds']:.0f} |"
        )
    # What a person concluded from the numbers lives under FINDINGS and survives a rerun of the table.
    old = open(path).read() if os.path.exists(path) else ""
    findings = old[old.index(FINDINGS) :] if FINDINGS in old else FINDINGS + "\n"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n\n" + findings)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU"
        )


def speed(args) -> None:
    """improved-diffusion's p_sample_loop against ours at equal model evaluations, alternating rounds."""
    sys.path.insert(0, args.improved_diffusion)
    from improved_diffusion import script_util as theirs

    model, diffusion, flags = load(args.run, args.step, "ancestral", args.nfe, args.weights)
    their_flags = {k: v for k, v in flags.items() if k in theirs.model_and_diffusion_defaults()}
    their_model, their_diffusion = theirs.create_model_and_diffusion(**their_flags)
    if flags["channel_mult"]:  # its factory takes no channel_mult: its UNet class does
        from improved_diffusion.unet import UNetModel

        size = flags["image_size"]
        their_model = UNetModel(
            in_channels=3, model_channels=flags["num_channels"], num_res_blocks=flags["num_res_blocks"],
            out_channels=6 if flags["learn_sigma"] else 3, dropout=flags["dropout"],
            attention_resolutions=tuple(size // int(r) for r in flags["attention_resolutions"].split(",")),
            channel_mult=tuple(int(c) for c in flags["channel_mult"].split(",")),
            num_classes=theirs.NUM_CLASSES if flags["class_cond"] else None, num_heads=flags["num_heads"],
            num_heads_upsample=flags["num_heads_upsample"],
            use_scale_shift_norm=flags["use_scale_shift_norm"],
        )  # fmt: skip
    state = model.state_dict()
    # Our null class is one more label-embedding row; unguided sampling never reads it.
    state["label_emb.weight"] = state["label_emb.weight"][: their_model.label_emb.weight.shape[0]]
    their_model.load_state_dict(state)
    their_model.eval()
    y = torch.arange(args.batch) % 10
    shape = (args.batch, 3, 32, 32)

    def theirs_run():
        torch.manual_seed(0)
        their_diffusion.p_sample_loop(their_model, shape, model_kwargs={"y": y}, progress=False)

    rows = {"improved-diffusion p_sample_loop (fp32 eager)": theirs_run}
    for name, precision, compiled in (
        ("ours fp32", "fp32", False),
        ("ours bf16 compiled", args.precision, True),
    ):
        for sampler in ("ancestral", "dpmpp_2m"):
            _, d, _ = load(args.run, args.step, sampler, args.nfe, args.weights)
            net = fast_model(model, precision, compiled)

            def ours_run(net=net, d=d, sampler=sampler):
                sample_images(net, d, list(range(args.batch)), 32, 0, {"y": y}, sampler=sampler,
                              device=torch.device("cpu"))  # fmt: skip

            rows[f"{name} {sampler}"] = ours_run
    first = {}
    for name, fn in rows.items():  # the first call compiles where asked: timed apart
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = args.batch / min(times["improved-diffusion p_sample_loop (fp32 eager)"])
    report = {"batch": args.batch, "nfe": args.nfe, "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "rows": {}}  # fmt: skip
    for name in rows:
        ips = args.batch / min(times[name])
        report["rows"][name] = {"images_per_s": ips, "vs_improved_diffusion": ips / base,
                                "first_call_s": first[name], "rounds_s": times[name]}  # fmt: skip
        print(f"{name}: {ips:.2f} images/s ({ips / base:.2f}x), first call {first[name]:.1f} s")
    best = max(r["vs_improved_diffusion"] for r in report["rows"].values())
    report["goal_2x"] = best >= 2.0
    print(f"goal: sampling images/s at equal model evaluations >= 2x improved-diffusion's: "
          f"{'met' if best >= 2 else 'MISSED'} ({best:.2f}x)")  # fmt: skip
    with open(args.out + "_speed.json", "w") as f:
        json.dump(report, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["quality", "speed"])
    p.add_argument("--run", required=True, help="a run directory of the README demo's recipe")
    p.add_argument("--steps", default="1000", help="quality: the trained steps to score")
    p.add_argument("--weights", default="", help="the weights files' prefix (default: the first rate EMA)")
    p.add_argument("--samplers", default=SAMPLERS, help="quality: SAMPLER:MODEL_EVALUATIONS,...")
    p.add_argument("--guidance", default=GUIDANCE, help="quality: the guidance scales")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--batch", type=int, default=250, help="images per sampling batch")
    p.add_argument("--interval", default="0.3,5", help="the guidance interval's LO,HI in sigma")
    p.add_argument("--precision", default="auto", help="the UNet's sampling precision (fast_model)")
    p.add_argument("--compile", action="store_true", help="quality: sample through a compiled UNet")
    p.add_argument("--reuse", action="store_true", help="quality: keep the cells OUT.json already has")
    p.add_argument("--step", type=int, default=1000, help="speed: the trained step")
    p.add_argument("--nfe", type=int, default=50, help="speed: model evaluations per image")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--improved_diffusion", default="", help="speed: a checkout of openai/improved-diffusion")
    p.add_argument("--out", default="benchmarks/sampling")
    args = p.parse_args()
    quality(args) if args.mode == "quality" else speed(args)


if __name__ == "__main__":
    main()
