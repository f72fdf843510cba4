"""Build a one-rank DeepSpeed engine from each given JSON (resolved as launch/train.py resolves it)
and write what the engine actually runs with, beside what the JSON asks for. Run by
test_ds_config.py as `python tests/engine_settings.py OUT.json CONFIG.json...`."""

import argparse
import json
import os
import sys

import torch
from conftest import tiny_flags
from deepspeed.accelerator import get_accelerator

from iddpm_ds import dist_util
from iddpm_ds.ds_config import load, resolve
from iddpm_ds.script_util import create_model_and_diffusion
from iddpm_ds.train_log import loss_scale_of
from iddpm_ds.train_util import create_engine

dist_util.setup_dist()
# Resolve and build as an fp16-capable device with native bf16 would, on any CPU: fp16 configs stay fp16 and
# bf16 "auto" becomes bf16.
get_accelerator().is_fp16_supported = lambda: True

FLAGS = argparse.Namespace(
    lr=1e-4, weight_decay=0.0, batch_size=1, microbatch=-1, use_fp16=False, fp16_scale_growth=1e-3
)
out = {}
for path in sys.argv[2:]:
    asked = load(path)
    cfg, _ = resolve(asked, FLAGS, set(), 1, fp16_supported=True, native_bf16=True)
    model, _ = create_model_and_diffusion(**tiny_flags())
    engine = create_engine(model, cfg)
    group = engine.optimizer.param_groups[0]
    out[os.path.basename(path)] = {
        "asked": asked,
        "gradient_clipping": engine.gradient_clipping(),
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
        "grad_accum_steps": engine.gradient_accumulation_steps(),
        "zero_stage": engine.zero_optimization_stage(),
        "fp16": engine.fp16_enabled(),
        "bf16": engine.bfloat16_enabled(),
        "loss_scale": loss_scale_of(engine) if engine.fp16_enabled() else None,
        "scale_args": engine.dynamic_loss_scale_args() if engine.fp16_enabled() else None,
        "optimizer": {
            "class": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
            "fused": group["fused"],
            "lr": group["lr"],
            "betas": list(group["betas"]),
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
        },
    }
with open(sys.argv[1], "w") as f:
    json.dump(out, f, default=str)
torch.distributed.destroy_process_group()
