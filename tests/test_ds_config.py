import argparse

import pytest

from iddpm_ds.ds_config import ConfigError, explicit_flags, resolve, validate


def args(**kw):
    base = dict(lr=1e-4, weight_decay=0.0, batch_size=1, microbatch=-1, use_fp16=False, fp16_scale_growth=1e-3)
    base.update(kw)
    return argparse.Namespace(**base)


BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "optimizer": {"type": "AdamW", "params": {"lr": 2e-4}},
        "fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}


def test_json_is_the_source_of_truth_without_flags():
    cfg, notes = resolve(BASE, args(lr=5.0), set(), world_size=2, fp16_supported=True)
    assert cfg["train_batch_size"] == 16 and cfg["optimizer"]["params"]["lr"] == 2e-4 and cfg["fp16"]["enabled"]
    assert notes == []


def test_explicit_flags_override_and_say_so():
    explicit = explicit_flags(["--lr=3e-4", "--batch_size", "8", "--microbatch", "2", "--fp16_scale_growth", "0.01"])
    cfg, notes = resolve(BASE, args(lr=3e-4, batch_size=8, microbatch=2, fp16_scale_growth=0.01), explicit, world_size=2, fp16_supported=True)
    assert cfg["optimizer"]["params"]["lr"] == 3e-4
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (2, 4, 16)
    assert cfg["fp16"]["loss_scale_window"] == 100
    assert len(notes) == 3


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
    assert len(notes) == 1 and notes[0].startswith("WARNING")


@pytest.mark.parametrize("cfg,key", [({"zero_optimisation": {}}, "zero_optimisation"), ({"train_batch_size": "8"}, "train_batch_size"),
                                     ({"fp16": {"enabeld": True}}, "enabeld"), ({"zero_optimization": {"stage": 4}}, "stage"),
                                     ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps")])
def test_validation_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_shipped_configs_are_valid():
    import glob
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = glob.glob(os.path.join(root, "ds_configs", "*.json"))
    assert {os.path.basename(f) for f in files} >= {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "bf16.json", "cpu.json"}
    for f in files:
        validate(json.load(open(f)), f)
