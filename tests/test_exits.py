"""Every entry point, and load_data held at module level, exits promptly on success, after a one-line
error and after an unexpected exception, leaving no process behind. Each command runs in a session of
its own; afterwards no process of that session may be alive. Slow: each test starts processes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
from conftest import TINY_SR_CLI, script_path, tiny_cli

from iddpm_ds.dist_util import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = tiny_cli(diffusion_steps=20, batch_size=4, num_workers=1)

pytestmark = pytest.mark.slow


def session_processes(sid: int) -> list:
    alive = []
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.Error):  # it ended while we looked
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def run_to_exit(cmd, timeout, env_extra=None):
    """Run cmd in a new session; fail if it (or anything it started) is still running after timeout s,
    or if any process of its session outlives it. Returns (returncode, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **(env_extra or {}))
    env.pop("OPENAI_LOGDIR", None)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)  # also waits for every holder of its pipes
    except subprocess.TimeoutExpired:
        left = [" ".join(p.cmdline()[:3]) for p in session_processes(proc.pid)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd[:3])} still running after {timeout} s: {left}")
    left = session_processes(proc.pid)
    for p in left:
        p.kill()
    assert not left, f"left running after {' '.join(cmd[:3])}: {[' '.join(p.cmdline()[:3]) for p in left]}"
    return proc.returncode, out, err


def launch(script, *args):
    return [sys.executable, script_path(script), *args]


def one_error_line(script, returncode, err):
    assert returncode == 2, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"{script}: error:"), err[
        -2000:
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step tiny run; its train.py must exit 0 within a minute and leave nothing behind."""
    run_dir = tmp_path_factory.mktemp("exits") / "run"
    code, _, err = run_to_exit(
        launch("train.py", "--log_dir", str(run_dir), *TINY, "--max_steps", "2"), timeout=120
    )
    assert code == 0, err[-3000:]
    return run_dir


def test_load_data_at_module_level_exits(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent("""
        from iddpm_ds.image_datasets import load_data
        it = load_data(data_dir="", batch_size=16, image_size=32)
        x, _ = next(it)
        print(tuple(x.shape))
    """)
    )
    code, out, err = run_to_exit([sys.executable, str(script)], timeout=60)
    assert code == 0 and "(16, 3, 32, 32)" in out, err


def test_train_exits_after_success_and_after_a_one_line_error(trained, tmp_path):
    assert (trained / "checkpoints" / "latest").exists()
    one_error_line(
        "train.py",
        *run_to_exit(
            launch(
                "train.py", "--log_dir", str(tmp_path / "bad"), *TINY, "--data_dir", str(tmp_path / "missing")
            ),
            timeout=60,
        )[::2],
    )


CRASH = """
import os, runpy, sys
from iddpm_ds import train_util
run_step = train_util.TrainLoop.run_step

def crashing_step(self):
    if self.step == 2 and self.rank == int(os.environ.get("CRASH_RANK", "0")):
        raise RuntimeError("injected failure mid-training")
    return run_step(self)

train_util.TrainLoop.run_step = crashing_step
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_exits_after_an_unexpected_exception_mid_training(tmp_path, ranks):
    wrapper = tmp_path / "crash_train.py"
    wrapper.write_text(CRASH.format(train=os.path.join(ROOT, "launch", "train.py")))
    args = ["--log_dir", str(tmp_path / "run"), *TINY, "--max_steps", "50", "--log_interval", "1"]
    if ranks == 1:
        cmd = [sys.executable, str(wrapper), *args]
    else:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(wrapper), *args]
    code, out, err = run_to_exit(cmd, timeout=150, env_extra={"CRASH_RANK": str(ranks - 1)})
    assert code != 0 and "injected failure mid-training" in out + err


def test_sample_and_nll_exit_after_success_and_after_an_error(trained, tmp_path):
    code, out, err = run_to_exit(
        launch(
            "sample.py",
            "--run_dir",
            str(trained),
            "--num_samples",
            "2",
            "--timestep_respacing",
            "3",
            "--out",
            str(tmp_path / "s.npz"),
        ),
        timeout=90,
    )
    assert code == 0 and (tmp_path / "s.npz").exists(), err[-2000:]
    one_error_line(
        "sample.py",
        *run_to_exit(launch("sample.py", "--run_dir", str(tmp_path / "nothing")), timeout=60)[::2],
    )
    code, out, err = run_to_exit(
        launch("nll.py", "--run_dir", str(trained), "--num_samples", "2", "--batch_size", "2"), timeout=120
    )
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["num_samples"] == 2, err[-2000:]
    one_error_line(
        "nll.py",
        *run_to_exit(
            launch("nll.py", "--run_dir", str(trained), "--data_dir", str(tmp_path / "x")), timeout=60
        )[::2],
    )


def test_data_tools_exit_after_success_and_after_an_error(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 10, 3), 40 * i, dtype=np.uint8)).save(folder / f"c{i}_{i}.png")
    code, _, err = run_to_exit(
        launch("make_shards.py", str(folder), str(tmp_path / "shards"), "--image_size", "8"), timeout=60
    )
    assert code == 0 and (tmp_path / "shards" / "index.json").exists(), err[-2000:]
    one_error_line(
        "make_shards.py",
        *run_to_exit(
            launch("make_shards.py", str(tmp_path / "none"), str(tmp_path / "o"), "--image_size", "8"),
            timeout=60,
        )[::2],
    )
    code, out, err = run_to_exit(
        launch(
            "bench_data.py", "--data_dir", str(folder), "--sizes", "8", "--batches", "2", "--batch_size", "2"
        ),
        timeout=90,
    )
    assert code == 0 and json.loads(out.strip().splitlines()[-1])[0]["image_size"] == 8, err[-2000:]
    one_error_line(
        "bench_data.py",
        *run_to_exit(launch("bench_data.py", "--data_dir", str(tmp_path / "none")), timeout=60)[::2],
    )


def test_super_resolution_exits_after_success_and_after_an_error(tmp_path):
    sr = [*TINY_SR_CLI, "--batch_size", "2"]
    code, _, err = run_to_exit(
        launch("super_res_train.py", "--log_dir", str(tmp_path / "sr"), *sr, "--max_steps", "1"), timeout=120
    )
    assert code == 0, err[-2000:]
    one_error_line(
        "super_res_train.py",
        *run_to_exit(launch("super_res_train.py", *sr, "--small_size", "32"), timeout=60)[::2],
    )
