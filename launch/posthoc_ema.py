"""Post-hoc EMA (Karras et al. 2024): an EMA of any length, chosen after training, from the power-function
averages a run tracked with --ema_profiles (iddpm_ds/phema.py).

    python launch/posthoc_ema.py runs/x --sigma_rel 0.08                 (at the newest snapshot step)
    python launch/posthoc_ema.py runs/x --sigma_rel 0.02,0.05,0.1 --step 3000

Writes RUN/ema_sigma{S}_{STEP}.pt for each width S: a full fp32 state_dict like the run's ema_RATE_STEP.pt,
which launch/sample.py takes as --run_dir RUN --model_path RUN/ema_sigma...pt and improved-diffusion's
image_sample.py as --model_path. The relative width sigma_rel is the average's std as a fraction of the
training so far: an EMA of rate r averages over a std of about 1 / (1 - r) steps, so at step t it is
comparable to sigma_rel = 1 / ((1 - r) t), e.g. rate 0.995 at step 1000: 0.2 (the profiles' shapes differ).
"""

import os
import re

from iddpm_ds.checkpointing import atomic_torch_save, load_state_dict_file
from iddpm_ds.errors import CheckpointError, ConfigError
from iddpm_ds.flags import make_parser, run_cli
from iddpm_ds.phema import reconstruct

SNAPSHOT = re.compile(r"phema_([0-9.]+)_(\d+)\.pt$")


def snapshots(run_dir: str) -> dict:
    """{(step, sigma_rel): path} of the run's post-hoc EMA snapshots."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir} is not a run directory")
    found = {}
    for name in os.listdir(run_dir):
        m = SNAPSHOT.match(name)
        if m:
            found[(int(m.group(2)), float(m.group(1)))] = os.path.join(run_dir, name)
    if not found:
        raise CheckpointError(
            f"{run_dir} has no post-hoc EMA snapshots (phema_*.pt): train with --ema_profiles, e.g. 0.05,0.1"
        )
    return found


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("run_dir", help="a training run directory with phema_*.pt snapshots")
    parser.add_argument("--sigma_rel", default="0.05", help="comma-separated relative widths to make")
    parser.add_argument(
        "--step", type=int, default=0, help="the step to make them at (0 = the newest snapshot's)"
    )
    args = parser.parse_args()
    try:
        widths = [float(w) for w in args.sigma_rel.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--sigma_rel {args.sigma_rel!r} must be comma-separated numbers") from None
    if not widths or not all(0 < w <= 0.28 for w in widths):
        raise ConfigError(f"--sigma_rel {args.sigma_rel}: each width lies in (0, 0.28], e.g. 0.05")
    found = snapshots(args.run_dir)
    step = args.step or max(s for s, _ in found)
    usable = sorted(k for k in found if k[0] <= step)
    if step not in {s for s, _ in usable}:
        steps = sorted({s for s, _ in found})
        raise ConfigError(f"--step {step} has no snapshot in {args.run_dir} (snapshot steps: {steps})")
    for width in widths:
        state_dict = reconstruct(usable, lambda s, r: load_state_dict_file(found[(s, r)]), step, width)
        out = os.path.join(args.run_dir, f"ema_sigma{width}_{step:06d}.pt")
        atomic_torch_save(state_dict, out)
        print(f"sigma_rel {width} at step {step} from {len(usable)} snapshots: {out}")


if __name__ == "__main__":
    run_cli(main)
