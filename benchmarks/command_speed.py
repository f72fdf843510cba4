"""The training speed a user gets: whole commands, as typed, on the same digits as a PNG folder:
improved-diffusion's own scripts/image_train.py against our launch/train.py, alternating, one process each.

    python benchmarks/command_speed.py --improved_diffusion DIR [--rounds 2] [--out OUT.json]

improved-diffusion's small 32 px config (64 channels, 2 res blocks, attention 16,8, learn_sigma, cosine
schedule, batch 16, lr 1e-4) for 10 and for 30 optimizer steps; the time of a step is the difference of the
two runs' wall clocks / 20, so start-up, data set-up and compilation cancel out (the inductor cache is warmed
by a first, untimed run of each compiled row). Rows: theirs (fp32), ours fp32 eager, ours bf16 (where the
CPU computes it natively) eager and compiled, at ZeRO-0 and ZeRO-2 (the README's cpu configs).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from parity_curve import MODEL_FLAGS, cpu_name, write_digits  # noqa: E402

from iddpm_ds.dist_util import native_bf16  # noqa: E402

BATCH = 16


def ours_config(work: str, stage: int, bf16: bool, compiled: bool) -> str:
    path = os.path.join(work, f"z{stage}_{'bf16' if bf16 else 'fp32'}_{'c' if compiled else 'e'}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "train_micro_batch_size_per_gpu": BATCH,
                "zero_optimization": {"stage": stage},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                "bf16": {"enabled": bf16},
                "compile": {"enabled": compiled},
            },
            f,
        )
    return path


def command(row: dict, data: str, work: str, steps: int, code_dir: str) -> list:
    out = os.path.join(work, f"run_{time.monotonic_ns()}")
    common = ["--data_dir", data, *MODEL_FLAGS, "--log_interval", "1000", "--save_interval", "1000000"]
    if row["side"] == "theirs":
        script = os.path.join(code_dir, "scripts", "image_train.py")
        return [
            sys.executable,
            script,
            *common,
            "--batch_size",
            str(BATCH),
            "--lr_anneal_steps",
            str(steps),
        ], out
    config = ours_config(work, row["stage"], row["bf16"], row["compiled"])
    script = os.path.join(REPO, "launch", "train.py")
    return [sys.executable, script, "--deepspeed_config", config, *common, "--max_steps", str(steps),
            "--log_dir", out], out  # fmt: skip


def timed(row, data, work, steps, code_dir) -> float:
    cmd, out = command(row, data, work, steps, code_dir)
    env = dict(os.environ, OPENAI_LOGDIR=out, PYTHONPATH=code_dir, OMP_NUM_THREADS=str(os.cpu_count() or 1),
               DS_ACCELERATOR="cpu")  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--improved_diffusion", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "command_speed.json"))
    args = p.parse_args()
    rows = [{"name": "improved-diffusion image_train.py (fp32)", "side": "theirs"}]
    rows.append(
        {"name": "ours fp32 eager, ZeRO-0", "side": "ours", "stage": 0, "bf16": False, "compiled": False}
    )
    if native_bf16():
        for stage in (0, 2):
            for compiled in (False, True):
                name = f"ours bf16 {'compiled' if compiled else 'eager'}, ZeRO-{stage}"
                rows.append(
                    {"name": name, "side": "ours", "stage": stage, "bf16": True, "compiled": compiled}
                )
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "digits")
        write_digits(data)
        for row in rows:  # warm-up: caches (inductor's, the page cache of the digits)
            if row.get("compiled"):
                timed(row, data, work, 2, args.improved_diffusion)
        times = {r["name"]: {10: [], 30: []} for r in rows}
        for _ in range(args.rounds):
            for row in rows:
                for steps in (10, 30):
                    times[row["name"]][steps].append(timed(row, data, work, steps, args.improved_diffusion))
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(), "batch": BATCH,
              "rows": {}}  # fmt: skip
    base = None
    for row in rows:
        t = times[row["name"]]
        step = (min(t[30]) - min(t[10])) / 20
        ips = BATCH / step
        base = base or ips
        report["rows"][row["name"]] = {"seconds_per_step": step, "images_per_s": ips, "vs_theirs": ips / base,
                                       "runs_10": t[10], "runs_30": t[30]}  # fmt: skip
        print(f"{row['name']}: {ips:.1f} images/s ({ips / base:.2f}x improved-diffusion's)")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
