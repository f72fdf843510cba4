"""launch/train.py with DeepSpeed's answer to "is fp16 supported?" forced to $FP16_SUPPORTED (1 or 0), so
a test takes the same precision path on every CPU: real fp16 as on a CPU with AVX512-FP16/AMX (or a GPU),
or the bf16 fallback of a CPU without them."""

import os
import runpy
import sys

from deepspeed.accelerator import get_accelerator

from iddpm_ds import dist_util  # noqa: F401  (before DeepSpeed: it picks the CPU accelerator quietly)

get_accelerator().is_fp16_supported = lambda: os.environ["FP16_SUPPORTED"] == "1"
train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
