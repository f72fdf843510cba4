"""The DeepSpeed engine end to end on CPU ranks (gloo). Slow: each test starts processes."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import copy_checkpoint, tiny_cli

from iddpm_ds.dist_util import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
TINY = tiny_cli(
    diffusion_steps=50,
    learn_sigma=True,
    class_cond=True,
    schedule_sampler="loss-second-moment",
    ema_rate="0.9,0.99",
    log_interval=1,
    num_workers=1,
)

pytestmark = pytest.mark.slow


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    e.pop("OPENAI_LOGDIR", None)
    return e


def run(cmd, timeout=300, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def launch(ranks, log_dir, *flags, config="ds_configs/cpu.json", fp16_supported=None):
    """train.py on `ranks` CPU ranks; fp16_supported True/False forces DeepSpeed's fp16 answer (any CPU)."""
    train = ["--deepspeed_config", config, "--log_dir", str(log_dir), *TINY, *flags]
    script = TRAIN
    env_prefix = []
    if fp16_supported is not None:
        script = os.path.join(ROOT, "tests", "train_forcing_fp16.py")
        env_prefix = ["env", f"FP16_SUPPORTED={int(fp16_supported)}"]
    if ranks == 1:
        return run([*env_prefix, sys.executable, script, *train])
    return run(
        [
            *env_prefix,
            "deepspeed",
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            script,
            *train,
        ]
    )


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenarios") / "out.json"
    run(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            os.path.join(ROOT, "tests", "ds_scenarios.py"),
            str(out),
        ],
        timeout=600,
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled_scenarios(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled_scenarios") / "out.json"
    script = os.path.join(ROOT, "tests", "ds_scenarios.py")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), script, "--compiled", str(out)]
    run(cmd, timeout=600)  # a cold inductor cache beside the other tests: minutes
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def annealed_run(tmp_path_factory):
    """One 4-step 1-rank run for the tests that read a finished run (each launch costs seconds of start-up):
    the lr annealed to zero over the 4 steps, labels dropped for guidance, an evaluation at the last step and
    post-hoc EMA snapshots every step with a checkpoint at step 3."""
    run_dir = tmp_path_factory.mktemp("annealed") / "run"
    launch(
        1, run_dir, "--lr_anneal_steps", "4", "--lr", "1e-3", "--class_dropout_prob", "0.5",
        "--eval_interval", "4", "--eval_samples", "4",
        "--ema_profiles", "0.05,0.1", "--ema_snapshot_interval", "1", "--save_interval", "3",
    )  # fmt: skip
    return run_dir


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_compiled_unet_steps_like_the_eager_one(compiled_scenarios, stage):
    """The compiled UNet (inductor at ZeRO-2, aot_eager's same traced graphs at the other stages; ZeRO-3
    gathers parameters between compiled pieces) with accumulation: the weights after 4 steps (2 at ZeRO-3)
    are eager's to rounding."""
    assert compiled_scenarios[f"compiled_vs_eager_z{stage}"] < 1e-6


def test_compiled_unet_keeps_ema_and_the_nonfinite_skip(compiled_scenarios):
    assert compiled_scenarios["compiled_ema_formula_z2"] < 1e-5
    r = compiled_scenarios["compiled_nonfinite_z0_fp32"]
    assert not r["applied"] and r["counted"] == 1 and r["master_diff"] == 0.0 and r["ema_diff"] == 0.0


def test_compiled_bf16_unet_trains_and_compiles_once(compiled_scenarios):
    r = compiled_scenarios["compiled_train_z2_bf16"]
    assert r["after"] < 0.8 * r["before"]
    assert r["graphs_after_first_step"] >= 1 and r["graphs_after_15_steps"] == r["graphs_after_first_step"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("prec", ["fp32", "bf16", "fp16"])
def test_every_stage_and_precision_trains(scenarios, stage, prec):
    r = scenarios[f"train_z{stage}_{prec}"]
    assert r["after"] == r["after"] and r["after"] < 0.8 * r["before"]
    assert r["skipped"] == 0


def test_zero2_matches_zero0_in_fp32(scenarios):
    assert scenarios["zero2_vs_zero0"] < 1e-6


def test_accumulation_matches_the_big_batch(scenarios):
    assert scenarios["accumulation_vs_batch"] < 1e-6


@pytest.mark.parametrize("stage", [2, 3])
def test_ema_formula_sharding_and_identical_sampler(scenarios, stage):
    assert scenarios[f"ema_formula_z{stage}"] < 1e-5
    assert scenarios[f"sampler_warm_z{stage}"] and scenarios[f"sampler_identical_z{stage}"]
    assert scenarios[f"ema_shard_fraction_z{stage}"] == pytest.approx(0.5, abs=0.01)


def test_fp16_overflow_step_is_skipped_and_touches_nothing(scenarios):
    r = scenarios["fp16_overflow"]
    assert not r["applied"] and r["skipped_delta"] == 1 and r["scale_halved"]
    assert r["master_diff"] == 0.0 and r["ema_diff"] == 0.0 and r["sampler_unchanged"]
    assert r["next_step_applied"]


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_zero0_reduced_precision_with_the_gpu_optimizer_wrapper(scenarios, prec):
    """On a GPU, DeepSpeed's FusedAdam puts ZeRO-0 fp16/bf16 under FP16_Optimizer (flat fp32 master per
    group);
    the engine must find those master weights (it refused to start before) and keep the EMA exact."""
    r = scenarios[f"fused_wrapper_z0_{prec}"]
    assert r["wrapper"] == "FP16_Optimizer"
    assert r["after"] < 0.8 * r["before"] and r["ema_formula"] < 1e-5


@pytest.mark.parametrize(
    "case", ["nonfinite_z0_fp32", "nonfinite_z2_bf16", "nonfinite_z0_bf16_fused_wrapper"]
)
def test_nonfinite_loss_step_is_skipped_and_counted(scenarios, case):
    r = scenarios[case]
    assert not r["applied"] and r["counted"] == 1 and r["consecutive"] == 1
    assert r["master_diff"] == 0.0 and r["ema_diff"] == 0.0
    assert r["consecutive_after_good_step"] == 0


def final_state(run_dir, step):
    d = os.path.join(run_dir, "checkpoints", f"step{step:06d}")
    model = torch.load(os.path.join(run_dir, f"model{step:06d}.pt"), weights_only=True)
    emas = {
        r: torch.load(os.path.join(run_dir, f"ema_{r}_{step:06d}.pt"), weights_only=True)
        for r in ("0.9", "0.99")
    }
    client = torch.load(os.path.join(d, "mp_rank_00_model_states.pt"), weights_only=False)
    return model, emas, client


# One rank runs compiled: the engine, checkpoints and data are the eager run's, the UNet goes through
# engine.compile (a second eager one-rank run would add nothing but time).
@pytest.mark.parametrize("ranks,compiled", [(2, False), (1, True)])
def test_exact_resume(tmp_path, ranks, compiled):
    K = 3
    common = ["--batch_size", "8", "--microbatch", "4", "--ema_profiles", "0.05,0.1"]
    config = "ds_configs/cpu.json"
    if compiled:  # the UNet through engine.compile (aot_eager: the traced graphs without a C++ build)
        settings = json.loads(open(os.path.join(ROOT, config)).read())
        settings["compile"] = {"enabled": True, "backend": "aot_eager"}
        config = str(tmp_path / "compiled.json")
        open(config, "w").write(json.dumps(settings))
    run_dir, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(ranks, run_dir, "--max_steps", str(2 * K), "--save_interval", str(K), *common, config=config)
    # The run directory as it stood at step K (its checkpoint, the weights files saved with it, the first K
    # progress records), and a run that picks up step K by itself from it.
    copy_checkpoint(run_dir, resumed, K)
    progress = (run_dir / "progress.jsonl").read_text().splitlines(keepends=True)
    (resumed / "progress.jsonl").write_text("".join(progress[:K]))
    launch(ranks, resumed, "--max_steps", str(2 * K), "--save_interval", str(K), *common, config=config)
    assert f"resumed from {resumed}/checkpoints/step{K:06d}" in (resumed / "log.txt").read_text()
    a_model, a_ema, a_client = final_state(run_dir, 2 * K)
    b_model, b_ema, b_client = final_state(resumed, 2 * K)
    assert all(torch.equal(a_model[k], b_model[k]) for k in a_model)
    for r in a_ema:
        assert all(torch.equal(a_ema[r][k], b_ema[r][k]) for k in a_ema[r])
    for width in ("0.05", "0.1"):  # the post-hoc EMA profiles too
        a, b = (torch.load(d / f"phema_{width}_{2 * K:06d}.pt") for d in (run_dir, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert a_client["data"] == b_client["data"] and a_client["data"]["position"] == 2 * K * 8 * ranks
    for k in ("loss_history", "loss_counts"):
        assert torch.equal(a_client["sampler"][k], b_client["sampler"][k])
    log = [json.loads(line) for line in open(resumed / "progress.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 2 * K + 1))
    if compiled:
        assert (resumed / "log.txt").read_text().count("compiled the UNet") == 1
        assert all(r["recompiles"] == 0 for r in log)


def test_killed_save_is_never_resumed_from(tmp_path):
    run_dir = tmp_path / "run"
    launch(1, run_dir, "--max_steps", "2")
    # A later save that died before COMPLETE: files present, marker absent, 'latest' not moved.
    broken = run_dir / "checkpoints" / "step000004"
    broken.mkdir()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 12)
    launch(1, run_dir, "--max_steps", "3")
    log = [json.loads(line) for line in open(run_dir / "progress.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]  # resumed at 2, not from the broken 4


def test_run_dir_holds_config_logs_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(
        2,
        run_dir,
        "--max_steps",
        "2",
        "--lr",
        "3e-4",
        "--sample_interval",
        "2",
        config="ds_configs/zero2.json",
        fp16_supported=False,
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_flags"]["image_size"] == 8 and config["world_size"] == 2
    # A CPU without fp16 (forced here, so on any CPU): the fp16 config runs in bf16, and says so once.
    assert config["deepspeed"]["fp16"]["enabled"] is False and config["precision"] == "bf16"
    assert proc.stdout.count("running the fp16 config in bf16 instead") == 1
    assert "gradient clipping: off" in (run_dir / "log.txt").read_text()
    # Output to files (pipes here, as in a batch job): the log lines and no progress bar redraws.
    assert "\r" not in proc.stdout + proc.stderr and "step 2 | loss" in proc.stdout
    assert config["deepspeed"]["optimizer"]["params"]["lr"] == 3e-4
    records = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    record = [r for r in records if "loss" in r][-1]
    for key in (
        "loss",
        "mse",
        "vb",
        "loss_q0",
        "grad_norm",
        "lr",
        "skipped_steps",
        "images_per_s",
        "data_skipped",
    ):
        assert key in record, key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"] and "train/loss_q3" in events.Tags()["scalars"]
    (grid,) = events.Images("samples/ema_0.9")  # the EMA preview at step 2
    assert grid.step == 2 and grid.width > 8 * 4
    assert (run_dir / "model000002.pt").exists() and (run_dir / "ema_0.9_000002.pt").exists()
    # Sampling-ready: the consolidated EMA loads into a fresh model with the saved flags.
    from iddpm_ds.checkpointing import load_official_state_dict, load_state_dict_file
    from iddpm_ds.script_util import create_model_and_diffusion

    model, _ = create_model_and_diffusion(**config["model_flags"])
    load_official_state_dict(model, load_state_dict_file(str(run_dir / "ema_0.9_000002.pt")))
    # Contradicting the saved model flags in the same run dir is a one-line error.
    proc = run(
        [sys.executable, TRAIN, "--log_dir", str(run_dir), *TINY, "--num_channels", "64", "--max_steps", "3"],
        check=False,
    )
    assert proc.returncode == 2 and "num_channels" in proc.stderr and "Traceback" not in proc.stderr


def test_fp16_with_dynamic_loss_scaling_where_the_device_offers_it(tmp_path):
    """Real fp16 (forced, so on any CPU): the scale backs off on overflow, those steps are skipped and
    counted, and it grows again after loss_scale_window good steps."""
    config = tmp_path / "fp16.json"
    config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 4,
                "zero_optimization": {"stage": 2},
                "fp16": {"enabled": True, "initial_scale_power": 24, "loss_scale_window": 2},
            }
        )
    )
    run_dir = tmp_path / "run"
    launch(1, run_dir, "--max_steps", "14", config=str(config), fp16_supported=True)
    assert json.loads((run_dir / "config.json").read_text())["precision"] == "fp16"
    log = [json.loads(line) for line in open(run_dir / "progress.jsonl")]
    scales = [r["loss_scale"] for r in log]
    skipped = [r["skipped_steps"] for r in log]
    assert scales[0] < 2.0**24 and skipped[-1] >= 1  # 2^24 overflows fp16 at once
    for before, after, skips_before, skips_after in zip(scales, scales[1:], skipped, skipped[1:]):
        assert (after < before) == (skips_after > skips_before)  # a halved scale is a skipped step
    assert any(after > before for before, after in zip(scales, scales[1:]))  # and it grows again
    assert all(r["loss"] == r["loss"] for r in log)
    assert all(
        torch.isfinite(v).all() for v in torch.load(run_dir / "model000014.pt", weights_only=True).values()
    )


def hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("localhost slots=2\n")
    return str(path)


@pytest.mark.parametrize("launcher", ["hostfile", "mpich", "mpirun", "torchrun"])
def test_launchers(tmp_path, launcher):
    run_dir = tmp_path / "run"
    args = [
        TRAIN,
        "--deepspeed_config",
        "ds_configs/cpu.json",
        "--log_dir",
        str(run_dir),
        *TINY,
        "--max_steps",
        "2",
    ]
    port = str(free_port())
    rendezvous = ["--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", port]
    if launcher == "hostfile":
        cmd = ["deepspeed", "--hostfile", hostfile(tmp_path), *rendezvous, *args]
    elif launcher == "mpich":
        mpich = ["--launcher", "mpich", "--force_multi"]
        cmd = ["deepspeed", *mpich, "--hostfile", hostfile(tmp_path), *rendezvous, *args]
    elif launcher == "mpirun":
        cmd = ["mpirun", "-n", "2", sys.executable, *args, "--master_port", port]
    else:  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            *args,
        ]
    run(cmd)
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    assert (run_dir / "checkpoints" / "step000002" / "COMPLETE").exists()


def test_mpirun_failure_on_one_rank_ends_the_job_fast():
    script = os.path.join(ROOT, "tests", "fail_on_rank1.py")
    t0 = time.time()
    proc = run(["mpirun", "-n", "2", sys.executable, script, str(free_port())], timeout=120, check=False)
    assert proc.returncode != 0
    assert time.time() - t0 < 30
    output = proc.stderr + proc.stdout
    # Hydra sometimes drops the ranks' last output when the job aborts; when it arrives it names the rank.
    assert not output or "rank 1" in output


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimisation": {"stage": 2}}))
    proc = run(
        [sys.executable, TRAIN, "--deepspeed_config", str(bad), "--log_dir", str(tmp_path / "r")], check=False
    )
    assert proc.returncode == 2 and "zero_optimisation" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(
        [
            sys.executable,
            TRAIN,
            "--log_dir",
            str(tmp_path / "r"),
            *TINY,
            "--batch_size",
            "6",
            "--microbatch",
            "4",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "multiple" in proc.stderr and "Traceback" not in proc.stderr


def test_lr_anneal_steps_decays_to_zero_and_stops(annealed_run):
    run_dir = annealed_run
    records = [json.loads(line) for line in open(run_dir / "progress.jsonl")]
    log = [r for r in records if "lr" in r]  # the evaluation at step 4 has a record of its own
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # stopped at lr_anneal_steps
    # The lr for the next step: 1e-3 * (1 - step/4).
    assert [r["lr"] for r in log] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert (run_dir / "checkpoints" / "step000004" / "COMPLETE").exists()


def test_a_longer_lr_anneal_continues_an_annealed_run(annealed_run, tmp_path):
    """An annealed run stops with lr 0 (the README demo); rerun with a longer --lr_anneal_steps it resumes
    and the lr follows the longer schedule from the step reached."""
    run_dir = tmp_path / "run"
    copy_checkpoint(annealed_run, run_dir, 4)
    launch(
        1, run_dir, "--lr_anneal_steps", "8", "--max_steps", "5", "--lr", "1e-3",
        "--class_dropout_prob", "0.5", "--ema_profiles", "0.05,0.1", "--ema_snapshot_interval", "1",
    )  # fmt: skip
    assert f"resumed from {run_dir}/checkpoints/step000004" in (run_dir / "log.txt").read_text()
    log = [r for r in map(json.loads, open(run_dir / "progress.jsonl")) if "lr" in r]
    assert [r["step"] for r in log] == [5] and log[0]["lr"] == pytest.approx(1e-3 * (1 - 5 / 8))


def test_fine_tune_from_an_improved_diffusion_checkpoint(tmp_path):
    from iddpm_ds.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    flags = model_and_diffusion_defaults()
    it = iter(TINY)
    for k, v in zip(it, it):
        if k[2:] in flags:
            flags[k[2:]] = type(flags[k[2:]])(v) if not isinstance(flags[k[2:]], bool) else v == "True"
    torch.manual_seed(5)
    model, _ = create_model_and_diffusion(**flags)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    official = tmp_path / "model250000.pt"
    torch.save(model.state_dict(), official)  # improved-diffusion's file layout: a bare state_dict
    run_dir = tmp_path / "run"
    proc = launch(1, run_dir, "--resume_checkpoint", str(official), "--max_steps", "1", "--lr", "1e-12")
    assert "initialised weights from" in proc.stdout
    tuned = torch.load(run_dir / "model000001.pt", weights_only=True)
    original = torch.load(official, weights_only=True)
    # It started from those weights.
    assert all(torch.allclose(tuned[k], original[k], atol=1e-6) for k in original)


def test_suggested_fixes_of_run_errors_work_and_sampling_finds_the_run(tmp_path):
    run_dir = tmp_path / "run"
    launch(1, run_dir, "--max_steps", "1")
    log_txt = (run_dir / "log.txt").read_text()
    # The per-interval line, as improved-diffusion prints it.
    assert "step 1 | loss " in log_txt and "img/s" in log_txt
    # A contradicting model flag on the same run: the error names its fix, and the fix works.
    contradicting = [sys.executable, TRAIN, "--log_dir", str(run_dir), *TINY, "--noise_schedule", "linear"]
    contradicting += ["--max_steps", "2"]
    proc = run(contradicting, check=False)
    assert proc.returncode == 2 and "--override True" in proc.stderr and "Traceback" not in proc.stderr
    run([*contradicting, "--override", "True"])
    assert json.loads((run_dir / "config.json").read_text())["model_flags"]["noise_schedule"] == "linear"
    # A JSON without a batch size: the error says to pass --batch_size, and that works.
    silent = tmp_path / "silent.json"
    silent.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    no_batch = [sys.executable, TRAIN, "--deepspeed_config", str(silent), "--log_dir", str(tmp_path / "b")]
    no_batch += [*TINY, "--max_steps", "1"]
    proc = run(no_batch, check=False)
    assert proc.returncode == 2 and "pass --batch_size" in proc.stderr
    run([*no_batch, "--batch_size", "4"])
    # ZeRO-0 fp32, where DeepSpeed computes no gradient norm: it is logged all the same.
    record = json.loads((tmp_path / "b" / "progress.jsonl").read_text().splitlines()[-1])
    assert record["grad_norm"] > 0
    # sample.py: a run directory as --model_path, $OPENAI_LOGDIR honoured; with no terminal, progress is one
    # line per batch.
    sample = os.path.join(ROOT, "launch", "sample.py")
    out_dir = tmp_path / "openai_logdir"
    proc = subprocess.run(
        [
            sys.executable,
            sample,
            "--model_path",
            str(run_dir),
            "--num_samples",
            "3",
            "--batch_size",
            "2",
            "--timestep_respacing",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**env(), "OPENAI_LOGDIR": str(out_dir)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out_dir / "samples_3x8x8x3.npz").exists() and (out_dir / "samples_3x8x8x3.png").exists()
    assert "created 2 samples" in proc.stdout and "created 3 samples" in proc.stdout
    assert "\r" not in proc.stderr


def test_classifier_free_guidance_trains_a_null_class_and_samples_with_it(annealed_run, tmp_path):
    # 4 steps: zero-initialised output convs pass no gradient to the label embedding before the third.
    run_dir = annealed_run
    assert json.loads((run_dir / "config.json").read_text())["model_flags"]["class_dropout_prob"] == 0.5
    trained = torch.load(run_dir / "model000004.pt", weights_only=True)["label_emb.weight"]
    assert trained.shape[0] == 1001  # the learned null class
    from iddpm_ds.script_util import create_model_and_diffusion
    from iddpm_ds.seeding import seed_everything

    seed_everything(0)  # train.py's initial weights
    flags = json.loads((run_dir / "config.json").read_text())["model_flags"]
    initial = create_model_and_diffusion(**flags)[0].state_dict()["label_emb.weight"]
    assert not torch.equal(trained[1000], initial[1000])  # dropped labels trained the null row
    assert torch.equal(trained[500], initial[500])  # a class the digits never use got no gradient
    sample = os.path.join(ROOT, "launch", "sample.py")
    out = tmp_path / "guided.npz"
    run(
        [
            sys.executable,
            sample,
            "--run_dir",
            str(run_dir),
            "--num_samples",
            "2",
            "--timestep_respacing",
            "3",
            "--guidance_scale",
            "2",
            "--out",
            str(out),
        ]
    )
    assert out.exists()


def test_eval_interval_logs_sample_metrics_of_the_ema(annealed_run):
    run_dir = annealed_run
    records = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    (evaluated,) = [r for r in records if "eval/mnist_acc" in r]
    assert evaluated["step"] == 4 and 0 <= evaluated["eval/mnist_acc"] <= 1 and evaluated["eval/mnist_fd"] > 0
    assert "eval step 4 | ema 0.9 | mnist_acc" in (run_dir / "log.txt").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert {"eval/mnist_acc", "eval/mnist_fd"} <= set(events.Tags()["scalars"])


def test_in_a_terminal_the_log_lines_are_drawn_above_the_progress_bar(tmp_path):
    """stdout and stderr on a terminal: tqdm's bar is drawn, and each log line is written on a line of its
    own (the bar cleared, then redrawn below it), never glued to the bar's text."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size
    cmd = [sys.executable, TRAIN, "--log_dir", str(tmp_path / "run"), *TINY, "--max_steps", "3"]
    proc = subprocess.Popen(cmd, stdout=follower, stderr=follower, env=env(), cwd=ROOT)
    os.close(follower)
    raw = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: every process holding it has ended
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait(timeout=60) == 0, raw.decode()[-3000:]
    text = raw.decode()
    assert "step/s" in text  # the bar
    lines = [segment for segment in text.split("\n") if " step 2 | loss" in segment]
    assert len(lines) == 1
    after_last_redraw = lines[0].rstrip("\r").split("\r")[-1]  # the terminal ends lines with \r\n
    assert after_last_redraw.startswith("20") and "step/s" not in after_last_redraw, repr(lines[0])


def test_post_hoc_ema_snapshots_make_any_width_that_sampling_loads(annealed_run, tmp_path):
    run_dir = annealed_run  # posthoc_ema.py adds its ema_sigma*.pt files beside the trained EMA
    snapshots = sorted(p.name for p in run_dir.glob("phema_*.pt"))
    assert snapshots == [f"phema_{w}_{s:06d}.pt" for w in ("0.05", "0.1") for s in range(1, 5)]
    meta = json.loads((run_dir / "checkpoints" / "step000003" / "COMPLETE").read_text())
    assert meta["phema"] == {"0.05": "phema_0.05_000003.pt", "0.1": "phema_0.1_000003.pt"}
    post = os.path.join(ROOT, "launch", "posthoc_ema.py")
    proc = run([sys.executable, post, str(run_dir), "--sigma_rel", "0.1,0.07"])
    assert "sigma_rel 0.07 at step 4 from 8 snapshots" in proc.stdout
    tracked = torch.load(run_dir / "phema_0.1_000004.pt", weights_only=True)
    rebuilt = torch.load(run_dir / "ema_sigma0.1_000004.pt", weights_only=True)
    assert all(torch.allclose(rebuilt[k], tracked[k], atol=1e-6) for k in tracked)
    sample = os.path.join(ROOT, "launch", "sample.py")
    model = str(run_dir / "ema_sigma0.07_000004.pt")
    out = tmp_path / "s.npz"
    run([sys.executable, sample, "--run_dir", str(run_dir), "--model_path", model, "--num_samples", "2",
         "--timestep_respacing", "5", "--out", str(out)])  # fmt: skip
    assert out.exists()
    # Sampling without --model_path still takes the trained EMA, not a post-hoc file.
    one = ["--num_samples", "1", "--timestep_respacing", "5", "--out", str(out)]
    proc = run([sys.executable, sample, "--run_dir", str(run_dir), *one])
    assert "ema_0.9_000004.pt" in proc.stdout
