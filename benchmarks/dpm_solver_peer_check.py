"""Peer check of our DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler, on trained models.

    pip install diffusers==0.42.1   # this script only; the test suite never imports diffusers
    python benchmarks/dpm_solver_peer_check.py --model RUN/FILE.pt [--model ...] [--nfe 20] [--out OUT]

For each model (its flags from the run's config.json), each solver (the ODE, `dpmsolver++`, and the SDE,
`sde-dpmsolver++`) and guidance 1 and 3, both sides sample the same labels from the same starting noise
through the same timesteps (ours: log-SNR-uniform, diffusion_for_sampler), the SDE from the same per-step
noise, with the same network call (our classifier-free guidance wrapper, timesteps rescaled as the model
was trained). diffusers is configured to be the same solver: order 2, midpoint, the model's betas,
prediction type (epsilon or sample), learned-range variances (it reads the first 3 channels, the eps half),
first order on the last step to noise level 0 (final_sigmas_type "zero"), and x_0 clipped to [-1, 1] (its
thresholding with sample_max_value 1 is a plain clip). Reports the largest difference of the final images
in [-1, 1] and the share of uint8 pixels that differ; writes OUT.json and OUT.md.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from sampling import cpu_name  # noqa: E402

from iddpm_ds.flags import load_trained_model, read_run_config  # noqa: E402
from iddpm_ds.sampling import classifier_free_guidance, diffusion_for_sampler  # noqa: E402
from iddpm_ds.script_util import NULL_CLASS  # noqa: E402


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def peer_check(path: str, nfe: int, images: int, sde: bool, guidance: float) -> dict:
    flags = dict(read_run_config(os.path.dirname(path))["model_flags"], timestep_respacing=str(nfe))
    model, diffusion = load_trained_model(path, flags, False, torch.device("cpu"))
    diffusion = diffusion_for_sampler(diffusion, "dpmpp_2m_sde" if sde else "dpmpp_2m")
    net = model if guidance == 1.0 else classifier_free_guidance(model, guidance, NULL_CLASS)
    gen = torch.Generator().manual_seed(0)
    shape = (images, 3, flags["image_size"], flags["image_size"])
    x_T = torch.randn(shape, generator=gen)
    step_noises = [torch.randn(shape, generator=gen) for _ in range(nfe)]
    y = torch.arange(images) % 10

    noises = iter(step_noises)
    ours = diffusion.dpm_solver_sample_loop(
        net, shape, noise=x_T, clip_denoised=True, model_kwargs={"y": y}, device=torch.device("cpu"), sde=sde,
        step_noise=lambda: next(noises),
    )  # fmt: skip

    base_steps = diffusion.original_num_steps
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=base_steps,
        trained_betas=1.0
        - diffusion.base_alphas_cumprod() / np.append(1.0, diffusion.base_alphas_cumprod()[:-1]),
        solver_order=2,
        prediction_type="sample" if flags["predict_xstart"] else "epsilon",
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        thresholding=True,
        sample_max_value=1.0,
        variance_type="learned_range" if flags["learn_sigma"] else None,
    )
    scheduler.set_timesteps(timesteps=list(reversed(diffusion.timestep_map)))
    scale = 1000.0 / base_steps if flags["rescale_timesteps"] else 1.0
    x = x_T
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = net(x, torch.full((images,), float(t) * scale), y=y)
            x = scheduler.step(out, t, x, variance_noise=step_noises[i]).prev_sample
    theirs = x
    return {
        "model": path, "sde": sde, "guidance": guidance, "nfe": nfe, "images": images,
        "prediction": "x_0" if flags["predict_xstart"] else "eps", "learn_sigma": flags["learn_sigma"],
        "max_abs_diff": float((ours - theirs).abs().max()),
        "uint8_pixels_differing": float((to_uint8(ours) != to_uint8(theirs)).mean()),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", action="append", required=True, help="a trained weights file in a run directory"
    )
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--out", default=os.path.join(HERE, "dpm_solver_peer_check"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for path in args.model:
        for sde in (False, True):
            for guidance in (1.0, 3.0):
                row = peer_check(path, args.nfe, args.images, sde, guidance)
                print(json.dumps(row))
                rows.append(row)
    import diffusers

    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}  # fmt: skip
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        "# DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler",
        "",
        f"`python benchmarks/dpm_solver_peer_check.py` on {meta['date']}, {meta['cpu']}, "
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, fp32. Same model, labels, starting noise, "
        "timesteps and (SDE) per-step noise on both sides; final images compared in [-1, 1] and as uint8.",
        "",
        "| model | prediction | learned sigma | solver | guidance | NFE | images | max abs diff "
        "| uint8 differing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {os.path.basename(os.path.dirname(r['model']))}/{os.path.basename(r['model'])} | "
            f"{r['prediction']} | {r['learn_sigma']} | {'SDE' if r['sde'] else 'ODE'} | {r['guidance']:g} | "
            f"{r['nfe']} | {r['images']} | {r['max_abs_diff']:.2e} | "
            f"{100 * r['uint8_pixels_differing']:.3f}% |"
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
