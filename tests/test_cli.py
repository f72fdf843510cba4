"""The entry points' command lines: invalid flags fail in one line before any work, abbreviations
are refused, every flag is documented, and each error's suggested fix works when run."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import script_path

from iddpm_ds.dist_util import close, free_port
from iddpm_ds.errors import ConfigError
from iddpm_ds.flags import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = [
    "train.py",
    "sample.py",
    "evaluate.py",
    "nll.py",
    "make_shards.py",
    "bench_data.py",
    "bench_train.py",
    "super_res_train.py",
    "super_res_sample.py",
    "posthoc_ema.py",
]
_modules = {}


def entry_point(script: str):
    """launch/SCRIPT (or benchmarks/SCRIPT) imported as a module (its main is not run)."""
    if script not in _modules:
        if os.path.join(ROOT, "launch") not in sys.path:  # as when run: super_res_*.py import train/sample
            sys.path.append(os.path.join(ROOT, "launch"))
        spec = importlib.util.spec_from_file_location(script[:-3], script_path(script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


def call_cli(module) -> None:
    """An entry point's command line as its `__main__` runs it: its cli(), else its main under run_cli."""
    module.cli() if hasattr(module, "cli") else run_cli(module.main)


def fails_in_one_line(script, argv, monkeypatch, capsys):
    """Run the entry point's main in this process; return its one stderr line after exit status 2."""
    module = entry_point(script)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        call_cli(module)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_.value.code == 2, captured.err
    assert "Traceback" not in captured.err and lines[-1].startswith(f"{script}: error: "), captured.err
    assert sum("error:" in line for line in lines) == 1, captured.err
    assert "run dir" not in captured.out  # nothing started
    return lines[-1]


TRAIN_CASES = [
    (["--diffusion_steps", "10"], "--noise_schedule cosine"),
    (["--diffusion_steps", "20"], "need T > 20"),  # a beta of exactly 1: alpha_bar reaches 0
    (["--image_size", "48"], "no default channel_mult"),
    (["--image_size", "30", "--channel_mult", "1,2,2"], "use a multiple of 4, e.g. 28 or 32"),
    (["--batchsize", "8"], "unrecognized arguments: --batchsize 8; did you mean --batch_size?"),
    (["--batch", "8"], "did you mean --batch_size?"),
    (["--learn_sgima", "True"], "did you mean --learn_sigma?"),
    (["--image_size", "32", "--num_channels", "48"], "multiples of 32"),
    (["--image_size", "32", "--attention_resolutions", "12"], "never reached"),
    (["--image_size", "32", "--attention_resolutions", "a,b"], "comma-separated integers"),
    (["--image_size", "32", "--num_heads", "3"], "--num_heads 3 does not divide"),
    (["--image_size", "32", "--num_heads_upsample", "5"], "--num_heads_upsample 5 does not divide"),
    (["--image_size", "32", "--num_head_channels", "48"], "--num_head_channels 48 does not divide"),
    (["--num_res_blocks", "0"], "--num_res_blocks"),
    (["--dropout", "1.5"], "--dropout"),
    (["--snr_gamma", "-1"], "--snr_gamma must not be negative"),
    (["--snr_gamma", "5", "--use_kl", "True"], "weights the mse term"),
    (["--noise_schedule", "quadratic"], "linear or cosine"),
    (["--timestep_respacing", "2000"], "does not fit"),
    (["--diffusion_steps", "100", "--timestep_respacing", "ddim33"], "does not fit"),
    (["--ema_rate", "1.0"], "strictly between 0 and 1"),
    (["--ema_rate", "0"], "strictly between 0 and 1"),
    (["--ema_rate", "0.99,x"], "comma-separated numbers"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--batch_size", "4", "--microbatch", "5"], "--microbatch"),
    (["--log_interval", "0"], "--log_interval"),
    (["--save_interval", "-1"], "--save_interval"),
    (["--max_steps", "-5"], "--max_steps"),
    (["--schedule_sampler", "importance"], "--schedule_sampler"),
    (["--lr", "-1"], "--lr"),
    (["--master_port", "70000"], "--master_port"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps"),
    (["--use_fp16", "maybe"], "boolean value expected"),
    (["--eval_interval", "-1"], "--eval_interval"),
    (["--eval_interval", "10", "--eval_metrics", "fid,blur"], "unknown blur"),
    (["--eval_interval", "10", "--eval_metrics", "mnist_acc"], "needs a class-conditional model"),
    (["--eval_interval", "10", "--eval_samples", "1"], "--eval_samples"),
]


@pytest.mark.parametrize("argv,message", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_invalid_training_flags_fail_in_one_line_before_any_work(argv, message, monkeypatch, capsys):
    assert message in fails_in_one_line("train.py", argv, monkeypatch, capsys)


def test_invalid_super_resolution_sizes(monkeypatch, capsys):
    line = fails_in_one_line(
        "super_res_train.py", ["--large_size", "64", "--small_size", "128"], monkeypatch, capsys
    )
    assert "--small_size 128" in line


@pytest.fixture
def bare_model(tmp_path):
    import torch
    from conftest import tiny_cli, tiny_flags

    from iddpm_ds.script_util import create_model_and_diffusion

    model, _ = create_model_and_diffusion(**tiny_flags())
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return ["--model_path", str(path), *tiny_cli(diffusion_steps=20)]


SAMPLE_CASES = [
    (["--num_samples", "0"], "--num_samples"),
    (["--sampler", "euler"], "--sampler must be one of ancestral, ddim, dpmpp_2m, dpmpp_2m_sde"),
    (["--precision", "fp8"], "--precision must be one of fp32, bf16, auto"),
    (["--sampler", "dpmpp_2m", "--timestep_respacing", "ddim10"], "not 'ddim10'"),
    (["--sampler", "dpmpp_2m", "--timestep_respacing", "5,5"], "a plain count"),
    (["--sampler", "dpmpp_2m_sde", "--timestep_respacing", "ddim5"], "--sampler dpmpp_2m_sde takes"),
    (["--sampler", "dpmpp_2m", "--use_ddim", "True"], "contradicts"),
    (["--guidance_interval", "5,1"], "needs 0 <= LO < HI"),
    (["--guidance_interval", "0.3"], "two noise levels"),
    (["--guidance_interval", "0.3,5"], "--guidance_scale is 1"),
    (["--guidance_scale", "3"], "needs a model trained with a null class"),
    (["--batch_size", "0"], "--batch_size"),
    (["--eta", "-1"], "--eta"),
    (["--class_labels", "3"], "class-conditional"),
    (["--timestep_respacing", "100"], "does not fit"),
]


@pytest.mark.parametrize("argv,message", SAMPLE_CASES, ids=[" ".join(a) for a, _ in SAMPLE_CASES])
def test_invalid_sampling_flags_fail_in_one_line(argv, message, bare_model, monkeypatch, capsys):
    assert message in fails_in_one_line("sample.py", [*bare_model, *argv], monkeypatch, capsys)


def test_other_entry_points_fail_in_one_line(tmp_path, monkeypatch, capsys):
    assert "--num_samples" in fails_in_one_line("nll.py", ["--num_samples", "0"], monkeypatch, capsys)
    assert "no images" in fails_in_one_line(
        "make_shards.py",
        [str(tmp_path / "nope"), str(tmp_path / "out"), "--image_size", "8"],
        monkeypatch,
        capsys,
    )
    assert "--shard_size" in fails_in_one_line(
        "make_shards.py",
        [str(tmp_path), str(tmp_path / "out"), "--image_size", "8", "--shard_size", "0"],
        monkeypatch,
        capsys,
    )
    assert "--batch_size" in fails_in_one_line("bench_data.py", ["--batch_size", "0"], monkeypatch, capsys)
    assert "--sizes" in fails_in_one_line("bench_data.py", ["--sizes", "big"], monkeypatch, capsys)


def test_an_error_met_after_the_ranks_meet_closes_the_process_group(monkeypatch, capsys):
    """A user error met once the process group is up (a run directory another training holds, a corrupt
    checkpoint) exits 2 with its one line and this rank's connections closed: left open at exit, gloo's and
    the store's threads can abort the process (status -6) after the line (seen once in a full suite run)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    def main():
        raise ConfigError("runs/x is being written by another live training")

    monkeypatch.setattr(sys, "argv", ["train.py"])
    try:
        with pytest.raises(SystemExit) as exit_:
            run_cli(main)
        assert exit_.value.code == 2
        assert not dist.is_initialized()
        assert (
            capsys.readouterr().err == "train.py: error: runs/x is being written by another live training\n"
        )
    finally:
        close()


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_abbreviated_flags_are_refused(script, monkeypatch, capsys):
    module = entry_point(script)
    # --batch for --batch_size (or --batches); make_shards has --shard_size and its positionals.
    argv = {
        "make_shards.py": ["src", "out", "--image_size", "8", "--shard", "4"],
        "posthoc_ema.py": ["run", "--sigma", "0.1"],
    }.get(script, ["--batch", "8"])
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        module.cli() if hasattr(module, "cli") else module.main()
    assert exit_.value.code == 2 and f"unrecognized arguments: {argv[-2]}" in capsys.readouterr().err


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_describes_every_flag_with_its_default(script, monkeypatch, capsys):
    module = entry_point(script)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_:
        call_cli(module)
    assert exit_.value.code == 0
    options = capsys.readouterr().out.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + options)[1:]
    assert len(entries) >= 3
    for entry in entries:
        flag = entry.split()[0].rstrip(",")
        if flag in ("-h", "--deepspeed", "--deepscale", "--deepscale_config"):  # argparse's, DeepSpeed's
            continue
        # "--flag VALUE   description (default: x)": a description, not just the metavar.
        description = re.sub(r"^\S+( [A-Z_]+)?", "", entry.strip()).strip()
        assert description and not description.startswith("(default"), f"{script}: {flag} has no description"
        positionals = ("src", "out", "run_dir", "--image_size", "--deepspeed_config")
        if entry.split()[1:2] != ["SRC"] and flag not in positionals:
            assert "(default:" in entry, f"{script}: {flag} shows no default"


def test_help_says_where_the_deepspeed_json_decides(capsys, monkeypatch):
    """--batch_size and the other JSON-overriding flags show the JSON as their default, not argparse's."""
    from iddpm_ds.ds_config import OVERRIDE_FLAGS

    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        entry_point("train.py").cli()
    entries = re.split(r"\n  (?=-)", "\n" + capsys.readouterr().out.split("options:", 1)[1])[1:]
    lines = {entry.split()[0]: " ".join(entry.split()) for entry in entries}
    for flag in OVERRIDE_FLAGS:
        assert "the DeepSpeed JSON's" in lines[f"--{flag}"].split("(default: ")[1], lines[f"--{flag}"]
        assert lines[f"--{flag}"].count("(default:") == 1


def test_sampling_batch_size_is_described_as_sampling(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sample.py", "--help"])
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        entry_point("sample.py").cli()
    entry = capsys.readouterr().out.split("  --batch_size", 1)[1].split("\n  -", 1)[0]
    assert "images per sampling forward pass" in " ".join(entry.split()) and "optimizer" not in entry


def test_a_bad_flag_under_a_launcher_is_one_line_from_rank_0_alone(tmp_path):
    """Every rank parses the same command line: under deepspeed the mistake is told once, with no usage
    block, and the job ends."""
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        script_path("train.py"),
        "--batchsize",
        "8",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "train.py: error:" in line]
    want = "train.py: error: unrecognized arguments: --batchsize 8; did you mean --batch_size? (--help lists"
    assert len(errors) == 1 and errors[0].startswith(want)
    assert "usage:" not in proc.stdout + proc.stderr


def test_suggested_fixes_for_flag_errors_work(monkeypatch, capsys):
    from iddpm_ds.flags import validate_model_flags
    from iddpm_ds.script_util import model_and_diffusion_defaults

    line = fails_in_one_line("train.py", ["--diffusion_steps", "10"], monkeypatch, capsys)
    assert "use --diffusion_steps 21 or more, or --noise_schedule cosine" in line
    for fix in ({"diffusion_steps": 21}, {"diffusion_steps": 10, "noise_schedule": "cosine"}):
        validate_model_flags({**model_and_diffusion_defaults(), **fix})
    line = fails_in_one_line("train.py", ["--image_size", "16"], monkeypatch, capsys)
    assert "e.g. 1,2,2 for 16 px" in line
    validate_model_flags(
        {
            **model_and_diffusion_defaults(),
            "image_size": 16,
            "channel_mult": "1,2,2",
            "attention_resolutions": "8",
        }
    )
