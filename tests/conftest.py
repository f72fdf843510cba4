import os

import pytest
import torch

from iddpm_ds.script_util import create_model_and_diffusion, model_and_diffusion_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_flags(**overrides):
    """A UNet small enough for CPU tests: 8 px, two levels, attention at 4 px."""
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=8,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="4",
        num_heads=2,
        diffusion_steps=20,
        noise_schedule="cosine",
        use_fused_kernels=False,
    )
    flags.update(overrides)
    return flags


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model_and_diffusion(**tiny_flags())


def report_fault(fault: str, injected: str, observed: str, lost_steps) -> None:
    """Record one fault test's outcome for benchmarks/RELIABILITY.md (only under
    benchmarks/reliability.py)."""
    import json

    path = os.environ.get("IDDPM_DS_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {"fault": fault, "injected": injected, "observed": observed, "lost_steps": lost_steps}
                )
                + "\n"
            )
