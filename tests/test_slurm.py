"""Schedulers: ranks found from SLURM's variables (srun), one writer per run directory, and, on a real
one-node SLURM (launch/slurm/local_cluster.sh), the batch template surviving its time limit, a SIGTERM, an
admin's requeue and a hard kill, ending bitwise where one uninterrupted run ends."""

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
from conftest import ROOT, copy_checkpoint, tiny_cli

from iddpm_ds import dist_util
from iddpm_ds.dist_util import free_port

TRAIN = os.path.join(ROOT, "launch", "train.py")
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# fp32 (cpu.json), ZeRO-2, the loss-aware sampler and two EMA rates: everything exact resume must restore.
FLAGS = [
    *tiny_cli(diffusion_steps=20, schedule_sampler="loss-second-moment", ema_rate="0.9,0.99"),
    *("--batch_size", "4", "--log_interval", "10", "--save_interval", "100", "--num_workers", "1"),
]


def test_srun_variables_give_rank_world_local_rank_and_rendezvous(monkeypatch):
    # A copy of the environment: what environment_from_srun sets must not reach the other tests' processes.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in RENDEZVOUS})
    slurm = dict(
        SLURM_STEP_ID="0",
        SLURM_STEP_NUM_TASKS="6",
        SLURM_STEP_TASKS_PER_NODE="2(x2),1,1",
        SLURM_STEP_NODELIST="gpu[007-008,010],cpu1",
        SLURM_NODEID="2",
        SLURM_PROCID="4",
        SLURM_LOCALID="0",
        SLURM_JOB_ID="123456",
    )
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert dist_util.launched() and dist_util.env_rank() == 4
    dist_util.environment_from_srun()
    got = {k: os.environ[k] for k in RENDEZVOUS[:-1]}
    assert got == dict(RANK="4", WORLD_SIZE="6", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="gpu007")
    ports = {dist_util.srun_port(job, restart) for job in (123456, 123457) for restart in (0, 1, 2)}
    assert os.environ["MASTER_PORT"] == str(dist_util.srun_port(123456)) and len(ports) == 6
    monkeypatch.setenv("MASTER_PORT", "29999")  # what a launcher (deepspeed --launcher slurm) sets wins
    dist_util.environment_from_srun()
    assert os.environ["MASTER_PORT"] == "29999"
    # A batch script's own environment has SLURM_PROCID and SLURM_NTASKS but no step: not a rank of several.
    monkeypatch.delenv("SLURM_STEP_ID")
    monkeypatch.delenv("RANK")
    assert not dist_util.launched_by_srun()


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS and k != "OPENAI_LOGDIR"}
    return dict(e, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)


@pytest.mark.slow
def test_two_tasks_with_srun_variables_train_as_one_two_rank_run(tmp_path):
    """What `srun -n 2 python launch/train.py` starts: two processes that see only SLURM's variables. They
    must meet as ranks 0 and 1 of one run, not train as two independent one-rank runs in one directory."""
    port = free_port()
    slurm = dict(
        SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
        SLURM_STEP_NODELIST="localhost", SLURM_NODEID="0", SLURM_JOB_ID="7", MASTER_PORT=str(port),
    )  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, TRAIN, "--log_dir", str(tmp_path / "run"), *FLAGS, "--max_steps", "2"],
            env=env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "| 2 ranks x 1 threads | rendezvous localhost:" in outputs[0]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2


def logged_steps(run_dir):
    path = os.path.join(run_dir, "progress.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if '"images_per_s"' in line]


def wait_for(condition, timeout, what, log=None):
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}" + (f":\n{log()}" if log else "")
        time.sleep(0.3)


@pytest.mark.slow
def test_a_run_directory_has_one_writer_and_a_dead_one_does_not_keep_it(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, TRAIN, "--log_dir", str(run_dir), *FLAGS, "--max_steps", "100000"]
    first = subprocess.Popen(cmd, env=env(SLURM_JOB_ID="4242"), cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: logged_steps(run_dir), 120, "the first run's first steps")
        second = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert lines[-1].startswith("train.py: error: ") and sum("error:" in line for line in lines) == 1
        assert "is being written by another live training" in lines[-1]
        assert f"pid {first.pid}, SLURM job 4242" in lines[-1]
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up of any kind: the lock must go with the process
        first.wait()
    third = subprocess.run(
        [*cmd[:-1], str(max(logged_steps(run_dir)) + 1)], env=env(), cwd=ROOT, capture_output=True, text=True
    )
    assert third.returncode == 0, third.stderr[-2000:]


# ------------------------------------------------------------------------------------------ a real SLURM
def missing_for_slurm() -> str:
    if os.geteuid() != 0:
        return "root (slurmd runs jobs as their users)"
    tools = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
    absent = [t for t in tools if shutil.which(t) is None]
    return f"{', '.join(absent)} (apt-get install slurm-wlm munge)" if absent else ""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private one-node SLURM for this module; the environment its commands need."""
    missing = missing_for_slurm()
    if missing:
        pytest.skip(f"a real SLURM needs {missing}")
    state = tmp_path_factory.mktemp("slurm")
    script = os.path.join(ROOT, "launch", "slurm", "local_cluster.sh")
    port = free_port() % 20000 + 10000  # below the ephemeral range, and not a cluster already running
    cluster_env = dict(os.environ, SLURM_LOCAL_PORT=str(port))
    subprocess.run(["bash", script, "start", str(state)], check=True, env=cluster_env, timeout=60)
    try:
        yield env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run(["bash", script, "stop", str(state)], env=cluster_env, timeout=60)


def job_field(job, field, slurm_env):
    out = subprocess.run(
        ["scontrol", "show", "job", str(job), "-o"], env=slurm_env, capture_output=True, text=True
    )
    for token in out.stdout.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def complete_checkpoints(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return sorted(
        int(d[4:])
        for d in os.listdir(root)
        if d[4:].isdigit() and os.path.exists(os.path.join(root, d, "COMPLETE"))
    )


def final_state(run_dir, step):
    model = torch.load(os.path.join(run_dir, f"model{step:06d}.pt"), weights_only=True)
    emas = [
        torch.load(os.path.join(run_dir, f"ema_{r}_{step:06d}.pt"), weights_only=True)
        for r in ("0.9", "0.99")
    ]
    ckpt = os.path.join(run_dir, "checkpoints", f"step{step:06d}", "mp_rank_00_model_states.pt")
    return model, emas, torch.load(ckpt, weights_only=False)


@pytest.mark.slow
def test_a_batch_job_survives_its_time_limit_a_sigterm_a_requeue_and_a_hard_kill_bitwise(slurm, tmp_path):
    """launch/slurm/train.sbatch with a 1-minute time limit on a run that needs more: (1) SLURM's SIGUSR1
    before the limit: checkpoint, requeue by the script; (2) `scancel --signal=TERM` (the ranks alone):
    checkpoint, exit 75, requeue; (3) an admin's `scontrol requeue`: checkpoint, SLURM requeues; (4) the
    ranks SIGKILLed: the job fails, and the same sbatch command resumes from the last complete checkpoint,
    losing only the steps since. Its model, EMAs, sampler state and data position at the end are bitwise
    those of one uninterrupted srun of the same steps (from the last checkpoint before the first stop)."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    options = ["--parsable", "--time=1", "--signal=B:USR1@10", f"--output={out}"]  # before the script
    template = [os.path.join(ROOT, "launch", "slurm", "train.sbatch"), "--log_dir", str(run_dir), *FLAGS]
    # No step limit yet: how far each allocation gets depends on the machine; the last one sets it.
    job = subprocess.run(
        ["sbatch", *options, *template, "--max_steps", "100000"],
        env=slurm,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr
    job = job.stdout.strip()

    def tail():
        state = f"job {job}: {job_field(job, 'JobState', slurm)} ({job_field(job, 'Reason', slurm)})"
        return state + "\n" + (out.read_text()[-4000:] if out.exists() else "(no job output)")

    def restarts():
        return int(job_field(job, "Restarts", slurm) or 0)

    def training_after(start_step):
        return (
            job_field(job, "JobState", slurm) == "RUNNING"
            and max(logged_steps(run_dir), default=0) > start_step
        )

    # (1) the time limit's warning: SIGUSR1 20 to 50 s into the allocation
    wait_for(lambda: restarts() == 1, 150, "the requeue before the time limit", tail)
    for action, count in ((["scancel", "--signal=TERM", job], 2), (["scontrol", "requeue", job], 3)):
        step = max(logged_steps(run_dir), default=0)
        wait_for(lambda: training_after(step + 20), 90, "the resumed run's steps", tail)
        subprocess.run(action, env=slurm, check=True)  # (2), then (3)
        wait_for(lambda c=count: restarts() == c, 90, f"restart {count}", tail)
    step = max(logged_steps(run_dir), default=0)
    wait_for(lambda: training_after(step + 20), 90, "the resumed run's steps", tail)

    # (4) a hard kill of every rank, between checkpoints: no signal the ranks could act on
    saved_before = complete_checkpoints(run_dir)[-1]

    def is_trainer(cmdline):
        return any(a.endswith("launch/train.py") for a in cmdline) and str(run_dir) in cmdline

    def is_rank(p):  # a Python running launch/train.py for this run (not srun), not a data loader worker
        python = p.info["name"].startswith("python")
        return python and is_trainer(p.info["cmdline"] or []) and not is_trainer(p.parent().cmdline())

    ranks = [p for p in psutil.process_iter(["name", "cmdline"]) if is_rank(p)]
    assert len(ranks) == 2
    for p in ranks:
        p.kill()
    wait_for(
        lambda: job_field(job, "JobState", slurm) in ("FAILED", "COMPLETED", ""), 60, "the killed job's end"
    )
    assert complete_checkpoints(run_dir)[-1] == saved_before  # nothing saved after the kill
    reached = max(logged_steps(run_dir))
    total = reached + 30
    resumed = subprocess.run(
        ["sbatch", "--wait", *options, *template, "--max_steps", str(total)],
        env=slurm,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, out.read_text()[-3000:]

    log = out.read_text()
    assert log.count("SIGUSR1 received") >= 1 and log.count(" requeued: the next start resumes") >= 2
    assert "stopped by SLURM with a complete checkpoint" in log  # the admin's requeue
    assert "train.py ended with exit status 137" in log and "ended with exit status 0" in log  # killed; done
    run_log = (run_dir / "log.txt").read_text()
    assert f"resumed from {run_dir}/checkpoints/step{saved_before:06d}" in run_log
    assert "\r" not in log  # a file: no progress bar fragments

    # The replay starts from the newest checkpoint written before the first interruption (the first
    # allocation ran uninterrupted up to it), so it needs not retrain the steps no signal came near.
    first_stop = int(run_log.split(f"resumed from {run_dir}/checkpoints/step", 1)[1][:6])
    before = [s for s in complete_checkpoints(run_dir) if s < first_stop]
    reference = tmp_path / "uninterrupted"
    if before:
        copy_checkpoint(run_dir, reference, before[-1])
    srun = [
        "srun",
        "-n",
        "2",
        sys.executable,
        TRAIN,
        "--log_dir",
        str(reference),
        *FLAGS,
        "--max_steps",
        str(total),
    ]
    straight = subprocess.run(srun, env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    assert "| 2 ranks x 1 threads |" in straight.stdout
    if before:
        assert f"resumed from {reference}/checkpoints/step{before[-1]:06d}" in straight.stdout
    (a_model, a_emas, a_client), (b_model, b_emas, b_client) = (
        final_state(run_dir, total),
        final_state(reference, total),
    )
    assert all(torch.equal(a_model[k], b_model[k]) for k in a_model)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(a_emas, b_emas) for k in a)
    assert a_client["data"] == b_client["data"]
    for k in ("loss_history", "loss_counts"):
        assert torch.equal(a_client["sampler"][k], b_client["sampler"][k])
