"""benchmarks/gpu_check.sh --dry-run: every command of the one prepared GPU run, on the CPU at tiny shapes, so
the GPU call cannot fail on a typo, a missing file or a missing wheel; and what each step writes is what the
GPU run's readers expect."""

import json
import os
import re
import subprocess

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(its printed log, the folder of its outputs), with the wheels made by gpu_wheels.sh checked too."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(tmp / "out"), WHEELS=str(tmp / "wheels"))
    wheels = subprocess.run(
        ["bash", "benchmarks/gpu_wheels.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert wheels.returncode == 0, wheels.stdout + wheels.stderr
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout, tmp / "out"


def read(out, name):
    return json.loads((out / name).read_text())


def test_every_step_runs_and_the_wheels_install_for_the_gpu_python(dry_run):
    log, out = dry_run
    assert re.search(
        r"wheels: .*deepspeed-0\.19\.8-py3-none-any\.whl .*install for Python 3\.12", log.replace("\n", " ")
    )
    ends = dict(re.findall(r"^== (.+): (exit \d+|skipped)", log, re.M))
    assert len(ends) == 9 and ends.pop("engine bf16, kernels on and off") == "skipped", ends
    assert all(end == "exit 0" for end in ends.values()), ends
    assert sorted(os.listdir(out)) == sorted(
        [
            "gpu_check.txt",
            "kernels.json",
            "engine.json",
            "samples.png",
            "step.json",
            "speed.json",
            "sweep.json",
        ]
    )  # at most 8 files come back from the GPU machine


def test_kernels_are_checked_against_float64_and_timed(dry_run):
    report = read(dry_run[1], "kernels.json")
    assert {r["provider"] for r in report["rows"]} >= {"triton", "eager"}
    assert not [r["error"] for r in report["rows"] if "error" in r]
    assert all(r["host_us_fwd_bwd"] > 0 for r in report["rows"])
    assert all(
        r["max_rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-4 and r["deterministic"]
        for r in report["rows"]
        if r["provider"] == "triton"
    )
    assert all(g["ok"] for g in report["goals"] if "rel err" in g["goal"])
    assert report["self_check"] and all(c["ok"] for c in report["self_check"])
    assert "# kernel goals: " in dry_run[0]


def test_every_candidate_tile_of_the_sweep_runs_and_is_right(dry_run):
    """The tile sweep, which only a GPU run uses: every candidate of every kernel must run and be right."""
    from kernels.bench import SWEEP

    rows = read(dry_run[1], "sweep.json")["sweep"]
    assert sorted((r["kernel"], tuple(r["tile"])) for r in rows) == sorted(
        (k, c) for k, cs in SWEEP["small_d"].items() for c in cs
    )
    assert all(
        "error" not in r and r["max_rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-4 and r["deterministic"]
        for r in rows
    )


def test_the_engine_trains_resumes_and_samples_in_both_precisions_kernels_on_and_off(dry_run):
    log, out = dry_run
    engine = read(out, "engine.json")
    runs = engine["runs"]
    # The dry run skips bf16: its commands differ from fp16's by the JSON alone.
    assert sorted(runs) == ["fp16_kernels", "fp16_reference"]
    assert runs["fp16_kernels"]["steps"] == 2 and "resumed from" in runs["fp16_kernels"]["resumed"][0]
    for name, run in runs.items():
        assert run["images_per_s"] > 0 and run["loss_last"] > 0, name
        # The interpreter runs the kernels' self-check on the CPU; with the kernels off there is none.
        assert bool(run["self_check"]) == name.endswith("_kernels"), name
        assert all(": passed" in line for line in run["self_check"]), name
    assert set(engine["kernel_speedup"]) == {"fp16"}
    assert (out / "samples.png").stat().st_size > 0
    assert "fp16: kernels on" in log


def test_the_training_step_rows(dry_run):
    log, out = dry_run
    step = read(out, "step.json")
    assert step["kernels_on"]["images_per_s"] > 0 and step["fell_back_to_reference"] == []
    # bf16 model, non-zero output convs: the kernels and the eager path give the same loss and gradients
    assert step["loss_rel_diff"] < 1e-2 and step["grad_rel_diff"] < 5e-2
    assert "goal: speed-up with kernels on >= 1.3x: not measured" in log

    result = read(out, "speed.json")
    entry = result["configs"]["custom"]
    assert entry["micro_batch"] == 2 and entry["graph_breaks"] == 0
    rows = entry["rows"]
    expected = ["plain fp32 (improved-diffusion's way)", "engine fp32", "engine fp32 compiled"]
    expected += ["engine fp32 compiled channels_last"]
    if result["native_bf16"]:
        expected += ["engine bf16", "engine bf16 compiled", "engine bf16 compiled channels_last"]
    assert list(rows) == expected
    assert rows[expected[0]]["vs_plain"] == 1.0
    for r in rows.values():
        assert len(r["step_s_rounds"]) == 2 and r["images_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["first_step_s"] > 0 and r["step_memory_mb"] >= 0
    # The goals are about improved-diffusion's small 32 px config, which this run did not time.
    assert result["goals"]["fp32 best >= 1.5x plain"] is None
    assert "goal: no graph breaks with fused kernels: met" in log
