"""Faults a long run meets: preemption, a dead rank, a full disk, divergence, a changed rank count, a
tampered file."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import report_fault, tiny_cli

from iddpm_ds.dist_util import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
TINY = tiny_cli(diffusion_steps=50, ema_rate="0.9", log_interval=1)

pytestmark = pytest.mark.slow


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    e.pop("OPENAI_LOGDIR", None)
    return e


def steps_logged(run_dir):
    path = os.path.join(run_dir, "progress.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


def complete_steps(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return sorted(
        int(d[4:])
        for d in os.listdir(root)
        if d.startswith("step") and d[4:].isdigit() and os.path.exists(os.path.join(root, d, "COMPLETE"))
    )


def start_training(run_dir, *flags, ranks=2):
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        TRAIN,
        "--log_dir",
        str(run_dir),
        *TINY,
        *flags,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT
    )


def wait_for_steps(run_dir, n, proc, timeout=120):
    t0 = time.time()
    while len(steps_logged(run_dir)) < n:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, "training did not start"
        time.sleep(0.2)


def rank_pids(proc):
    ranks = {}
    for child in launcher_pid(proc).children():  # not their loader workers, which share the command line
        for arg in child.cmdline():
            if arg.startswith("--local_rank="):
                ranks[int(arg.split("=")[1])] = child
    return ranks


def launcher_pid(proc):
    return next(
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "deepspeed.launcher.launch" in " ".join(c.cmdline())
    )


@pytest.mark.parametrize("target", ["rank1", "runner"])
def test_preemption_saves_a_complete_checkpoint_and_the_rerun_resumes(tmp_path, target):
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, "--max_steps", "100000", "--save_interval", "100000")
    wait_for_steps(run_dir, 3, proc)
    ranks = rank_pids(proc)
    if target == "rank1":
        os.kill(ranks[1].pid, signal.SIGTERM)  # what a scheduler sends to preempt
    else:
        os.kill(proc.pid, signal.SIGUSR1)  # the launcher dies of it; the ranks notice it is gone
    gone, alive = psutil.wait_procs(list(ranks.values()), timeout=60)
    assert not alive, "ranks did not stop"
    time.sleep(1)  # let the (possibly orphaned) deepspeed launcher report its ranks
    out, _ = proc.communicate(timeout=60)
    # The ranks exit with 75, "stopped early with a complete checkpoint: run again", which the launcher
    # reports (and then ends any rank still exiting).
    assert "exits with return code = 75" in out, out[-3000:]
    saved = complete_steps(run_dir)
    assert saved and saved[-1] >= 3 and saved[-1] == steps_logged(run_dir)[-1]
    stopped_at = max(steps_logged(run_dir))
    how = (
        "SIGTERM to rank 1"
        if target == "rank1"
        else "SIGUSR1 to the deepspeed launcher (it dies; ranks see it gone)"
    )
    # The same command (with a nearer end) resumes from it.
    s = saved[-1]
    subprocess.run(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            TRAIN,
            "--log_dir",
            str(run_dir),
            *TINY,
            "--max_steps",
            str(s + 2),
        ],
        check=True,
        capture_output=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert steps_logged(run_dir)[-3:] == [s, s + 1, s + 2]
    report_fault(
        "preemption",
        how,
        f"every rank finished step {stopped_at}, saved a complete checkpoint and exited 0; "
        f"the rerun resumed at step {s + 1}",
        stopped_at - s,
    )


def test_a_killed_rank_ends_the_job_within_60s_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, "--max_steps", "100000")
    wait_for_steps(run_dir, 2, proc)
    t0 = time.time()
    os.kill(rank_pids(proc)[1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=90)
    assert time.time() - t0 < 60 and proc.returncode != 0
    assert "--local_rank=1" in out and "-9" in out  # the launcher names the rank and its signal
    done = max(steps_logged(run_dir))
    report_fault(
        "dead rank",
        "SIGKILL to rank 1 mid-training",
        f"job ended {time.time() - t0:.1f} s later; the launcher named "
        "--local_rank=1 and return code -9; no checkpoint since the start",
        done,
    )


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    common = [TRAIN, "--log_dir", str(run_dir), *TINY, "--save_interval", "2"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "enospc_train.py"), *common[1:], "--max_steps", "6"],
        capture_output=True,
        text=True,
        env={**env(), "FAIL_AT_STEP": "4"},
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    (err,) = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert "No space left on device" in err and "step000004" in err and "step000002" in err
    assert complete_steps(run_dir) == [2]
    subprocess.run(
        [sys.executable, *common, "--max_steps", "5"],
        check=True,
        capture_output=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert steps_logged(run_dir)[-3:] == [3, 4, 5] and complete_steps(run_dir)[-1] == 5
    report_fault(
        "disk full during save",
        "torch.save raises ENOSPC while writing the step-4 checkpoint",
        "one-line error naming ENOSPC, step 4 and the kept step-2 checkpoint; step 4 never got COMPLETE; "
        "rerun resumed at 3",
        2,
    )


@pytest.mark.parametrize("config", ["ds_configs/cpu.json", "ds_configs/bf16.json"])
def test_divergence_stops_with_a_checkpoint_from_before(tmp_path, config):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--deepspeed_config",
            config,
            "--log_dir",
            str(run_dir),
            *TINY,
            "--lr",
            "1e30",
            "--batch_size",
            "4",
            "--max_nonfinite_steps",
            "3",
            "--max_steps",
            "50",
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    (err,) = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert "non-finite loss" in err
    last = complete_steps(run_dir)[-1]
    model = torch.load(run_dir / f"model{last:06d}.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in model.values())
    record = json.loads((run_dir / "progress.jsonl").read_text().splitlines()[-1])
    assert record["nonfinite_steps"] >= 3
    report_fault(
        f"divergence ({os.path.basename(config)})",
        "--lr 1e30: the loss overflows to inf",
        f"{record['nonfinite_steps']} non-finite steps skipped and counted; stopped after 3 in a row with "
        f"exit 3 and a checkpoint of finite pre-divergence weights at step {last}",
        0,
    )


ELASTIC = os.path.join(ROOT, "tests", "elastic_scenario.py")


def elastic(ranks, mode, run_dir, out):
    launcher = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd = [*launcher, ELASTIC, mode, str(run_dir), str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=env(), cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory):
    """(a 2-rank ZeRO-2 run directory after 3 steps, the state it dumped), made once for both rank counts."""
    tmp = tmp_path_factory.mktemp("elastic")
    elastic(2, "train", tmp / "run", tmp / "ref.pt")
    return tmp / "run", torch.load(tmp / "ref.pt", weights_only=False)


@pytest.mark.parametrize("ranks", [1, 4])
def test_elastic_resume_of_a_2_rank_zero2_checkpoint(tmp_path, zero2_checkpoint, ranks):
    source, ref = zero2_checkpoint
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)  # a resume converts the checkpoint in place
    elastic(ranks, "resume", run_dir, tmp_path / "resumed.pt")
    got = torch.load(tmp_path / "resumed.pt", weights_only=False)
    for key in ("master", "ema", "phema", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(ref[key][n], got[key][n]) for n in ref[key]), key
    assert (
        torch.equal(ref["sampler"], got["sampler"])
        and ref["position"] == got["position"]
        and ref["step"] == got["step"] == 3
    )
    report_fault(
        f"elastic resume 2 -> {ranks} ranks",
        "ZeRO-2 checkpoint of 2 ranks loaded by a different rank count (universal copy)",
        "fp32 master, EMA, post-hoc EMA profile, Adam moments, sampler history, data position bitwise equal",
        0,
    )


def test_a_tampered_checkpoint_file_is_refused(tmp_path):
    run_dir = tmp_path / "run"

    def train(max_steps: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, TRAIN, "--log_dir", str(run_dir), *TINY, "--max_steps", max_steps]
        return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)

    first = train("1")
    assert first.returncode == 0, first.stderr[-2000:]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"data": Evil()}, run_dir / "checkpoints" / "step000001" / "mp_rank_00_model_states.pt")
    proc = train("2")
    assert proc.returncode == 2 and "refusing" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    report_fault(
        "tampered checkpoint",
        "a pickle that runs a shell command replaces mp_rank_00_model_states.pt",
        "refused with a one-line error before DeepSpeed opened it; the command never ran",
        0,
    )
