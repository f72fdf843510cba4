import argparse

import pytest
import torch

from iddpm_ds.ds_config import OVERRIDE_FLAGS, resolve, split_compile, validate
from iddpm_ds.flags import ConfigError, explicit_flags


def args(**kw):
    return argparse.Namespace(**{**OVERRIDE_FLAGS, **kw})


BASE = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-4}},
    "fp16": {"enabled": True},
    "zero_optimization": {"stage": 2},
}


def test_json_is_the_source_of_truth_without_flags():
    cfg, notes = resolve(BASE, args(lr=5.0), set(), world_size=2, fp16_supported=True)
    assert (
        cfg["train_batch_size"] == 16 and cfg["optimizer"]["params"]["lr"] == 2e-4 and cfg["fp16"]["enabled"]
    )
    assert notes == ["gradient clipping: off (the JSON's gradient_clipping)"]


def test_explicit_flags_override_and_say_so():
    explicit = explicit_flags(
        ["--lr=3e-4", "--batch_size", "8", "--microbatch", "2", "--fp16_scale_growth", "0.01"]
    )
    cfg, notes = resolve(
        BASE,
        args(lr=3e-4, batch_size=8, microbatch=2, fp16_scale_growth=0.01),
        explicit,
        world_size=2,
        fp16_supported=True,
    )
    assert cfg["optimizer"]["params"]["lr"] == 3e-4
    assert (
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
        cfg["train_batch_size"],
    ) == (2, 4, 16)
    assert cfg["fp16"]["loss_scale_window"] == 100
    assert len([n for n in notes if n.startswith("--")]) == 3


def test_contradictions_are_errors():
    with pytest.raises(ConfigError, match="multiple"):
        resolve(BASE, args(batch_size=6, microbatch=4), {"batch_size", "microbatch"}, 1, True)
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve({**BASE, "train_batch_size": 100}, args(), set(), 2, True)
    with pytest.raises(ConfigError, match="both"):
        resolve({**BASE, "bf16": {"enabled": True}}, args(), set(), 1, True)


def test_fp16_falls_back_to_bf16_with_one_warning_where_unsupported():
    cfg, notes = resolve(BASE, args(), set(), 1, fp16_supported=False)
    assert not cfg["fp16"]["enabled"] and cfg["bf16"]["enabled"]
    assert len([n for n in notes if n.startswith("WARNING")]) == 1


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"zero_optimisation": {}}, "zero_optimisation"),
        ({"train_batch_size": "8"}, "train_batch_size"),
        ({"fp16": {"enabeld": True}}, "enabeld"),
        ({"zero_optimization": {"stage": 4}}, "stage"),
        ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps"),
        ({"compile": {"enabled": "yes"}}, "compile.enabled"),
        ({"compile": {"enable": True}}, "enable"),
        ({"compile": {"kwargs": {"backend": "eager"}}}, "compile.backend"),
    ],
)
def test_validation_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_shipped_configs_are_valid():
    import glob
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = glob.glob(os.path.join(root, "ds_configs", "*.json"))
    assert {os.path.basename(f) for f in files} >= {
        "zero0.json",
        "zero1.json",
        "zero2.json",
        "zero3.json",
        "bf16.json",
        "cpu.json",
        "cpu_bf16_auto.json",
    }
    for f in files:
        validate(json.load(open(f)), f)


def test_deepspeed_defaults_that_change_training_are_replaced_by_improved_diffusions():
    cfg, notes = resolve(
        {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}}, args(), set(), 1, True
    )
    assert cfg["gradient_clipping"] == 0.0 and "gradient clipping: off" in notes[0]
    assert cfg["fp16"] == {
        "enabled": True,
        "initial_scale_power": 20,
        "loss_scale_window": 1000,
        "hysteresis": 1,
        "min_loss_scale": 1,
    }
    cfg, notes = resolve(
        {**BASE, "gradient_clipping": 0.5, "fp16": {"enabled": True, "hysteresis": 2}}, args(), set(), 1, True
    )
    assert (
        cfg["gradient_clipping"] == 0.5 and "global norm 0.5" in notes[0] and cfg["fp16"]["hysteresis"] == 2
    )


@pytest.mark.slow
def test_the_engine_runs_with_what_the_json_says(tmp_path):
    """Every shipped config, and JSONs silent on clipping and loss scaling, read back from a built engine."""
    import glob
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    silent_fp16 = tmp_path / "silent_fp16.json"
    silent_fp16.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}}))
    silent_fp32 = tmp_path / "silent_fp32.json"
    silent_fp32.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}})
    )
    clipped = tmp_path / "clipped.json"
    clipped.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5}))
    plain_adam = tmp_path / "plain_adam.json"
    plain_adam.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "optimizer": {"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.1}},
            }
        )
    )
    configs = sorted(glob.glob(os.path.join(root, "ds_configs", "*.json"))) + [
        str(silent_fp16),
        str(silent_fp32),
        str(clipped),
        str(plain_adam),
    ]
    out = tmp_path / "settings.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    subprocess.run(
        [sys.executable, os.path.join(root, "tests", "engine_settings.py"), str(out), *configs],
        check=True,
        timeout=300,
        env=env,
        capture_output=True,
    )
    settings = json.loads(out.read_text())
    assert len(settings) == len(configs)
    for name, got in settings.items():
        asked = got["asked"]
        assert got["gradient_clipping"] == asked.get("gradient_clipping", 0.0), name
        assert got["micro_batch"] == asked["train_micro_batch_size_per_gpu"], name
        assert got["grad_accum_steps"] == asked.get("gradient_accumulation_steps", 1), name
        assert got["zero_stage"] == asked.get("zero_optimization", {}).get("stage", 0), name
        assert got["fp16"] == asked.get("fp16", {}).get("enabled", False), name
        assert got["bf16"] == (asked.get("bf16", {}).get("enabled", False) in (True, "auto")), name
        if got["fp16"]:
            fp16 = asked["fp16"]
            assert got["loss_scale"] == 2.0 ** fp16.get("initial_scale_power", 20), name
            assert got["scale_args"]["delayed_shift"] == fp16.get("hysteresis", 1), name
            assert got["scale_args"]["scale_window"] == fp16.get("loss_scale_window", 1000), name
        params = asked.get("optimizer", {}).get("params", {})
        want = {
            # torch fused on every device; DeepSpeed's Adam is AdamW unless adam_w_mode is false
            "class": "AdamW" if params.get("adam_w_mode", True) else "Adam",
            "fused": True,
            "lr": params.get("lr", 1e-4),
            "betas": params.get("betas", [0.9, 0.999]),
            "eps": params.get("eps", 1e-8),
            "weight_decay": params.get("weight_decay", 0.0),
        }
        assert got["optimizer"] == want, name


def test_compile_section_is_ours_and_deepspeeds_and_the_flag_overrides_it():
    """compile.enabled/backend/kwargs drive engine.compile (DeepSpeed 0.19 refuses them), DeepCompile's keys
    go on to DeepSpeed, and --compile wins over the JSON only when given."""
    json_cfg = {**BASE, "compile": {"enabled": True, "kwargs": {"mode": "max-autotune"}, "debug_log": False}}
    validate(json_cfg)
    cfg, _ = resolve(json_cfg, args(compile=False), set(), 1, True)
    deepspeed_cfg, ours = split_compile(cfg)
    assert ours == {"enabled": True, "backend": "inductor", "kwargs": {"mode": "max-autotune"}}
    assert deepspeed_cfg["compile"] == {"debug_log": False}
    cfg, notes = resolve(json_cfg, args(compile=False), {"compile"}, 1, True)
    assert split_compile(cfg)[1]["enabled"] is False and any(n.startswith("--compile") for n in notes)
    assert "compile" not in split_compile(BASE)[0] and split_compile(BASE)[1]["enabled"] is False


def test_compile_with_zero3_says_what_to_expect():
    zero3 = {**BASE, "zero_optimization": {"stage": 3}}
    _, notes = resolve(zero3, args(compile=True), {"compile"}, 1, True)
    assert any(n.startswith("compile with ZeRO-3") for n in notes)
    _, notes = resolve(zero3, args(), set(), 1, True)  # uncompiled: nothing to say
    assert not any(n.startswith("compile with ZeRO-3") for n in notes)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_device(native):
    """bf16.enabled "auto": bf16 where the device computes it natively, fp32 (not emulated bf16) elsewhere;
    the log says which."""
    cfg = {**BASE, "fp16": {"enabled": False}, "bf16": {"enabled": "auto"}}
    validate(cfg)
    resolved, notes = resolve(cfg, args(), set(), 1, True, native_bf16=native)
    assert resolved["bf16"]["enabled"] is native
    assert any(n.startswith("bf16.enabled auto: " + ("bf16" if native else "fp32")) for n in notes)
    with pytest.raises(ConfigError, match="fp16.enabled"):
        validate({**BASE, "fp16": {"enabled": "auto"}})


def test_optimizer_params_that_adam_does_not_take_are_one_line_errors():
    from iddpm_ds.train_util import create_engine

    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}}
    with pytest.raises(ConfigError, match=r"optimizer.params \['momentum'\] are not Adam's"):
        create_engine(torch.nn.Linear(2, 2), cfg)


def test_deepspeeds_muon_modules_are_stood_in_for_our_adamw_and_restored_for_its_own_optimizers(monkeypatch):
    """Our AdamW: DeepSpeed's Muon checks are answered without importing Muon (which loads inductor, seconds
    per rank); an optimizer DeepSpeed builds itself gets the real modules back."""
    import sys

    from iddpm_ds import train_util

    names = train_util._MUON_MODULES
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    train_util._answer_muon_checks_without_importing_it(ours=True)
    stand_ins = [sys.modules[name] for name in names]
    assert not isinstance(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), stand_ins[0].MuonWithAuxAdam)
    with pytest.raises(RuntimeError, match="Muon's update on a run whose optimizer is AdamW"):
        stand_ins[1].muon_update(torch.zeros(2, 2))
    train_util._answer_muon_checks_without_importing_it(ours=False)
    assert not any(name in sys.modules for name in names)


def test_fp16_on_a_cpu_with_native_bf16_says_bf16_is_faster():
    """The GPU configs (zero0-3.json) are fp16; run on a CPU whose fp16 is supported but whose bf16 is native
    (an AMX or AVX512-BF16 Xeon), they say so in one line at start."""
    cfg = {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}}
    for native, warned in ((True, True), (False, False)):
        resolved, notes = resolve(cfg, args(), set(), 1, True, native_bf16=native, on_cpu=True)
        assert resolved["fp16"]["enabled"] and any("fp16 is the far slower one" in n for n in notes) == warned
    _, notes = resolve(cfg, args(), set(), 1, True, native_bf16=True, on_cpu=False)  # a GPU: no warning
    assert not any("far slower" in n for n in notes)
