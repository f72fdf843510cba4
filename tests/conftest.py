import os
import shutil

import pytest
import torch

from iddpm_ds.script_util import create_model_and_diffusion, model_and_diffusion_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_path(script: str) -> str:
    """Where a script lives: launch/ (what users run) or benchmarks/ (what measures it)."""
    for folder in ("launch", "benchmarks"):
        path = os.path.join(ROOT, folder, script)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(script)


def pytest_configure(config):
    """Import Triton with its interpreter on, before any test runs.

    Triton builds its language library (tl.sum, tl.sigmoid, ...) for the interpreter only if
    TRITON_INTERPRET=1 when it is first imported. A test that imports it first otherwise (torch.optim's
    first step does, through torch._dynamo) would break the interpreted kernel tests after it.
    test_kernels.py turns the interpreter on for each of its tests; elsewhere it stays off.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: F401

    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous

    if os.environ.get("PYTEST_XDIST_WORKER"):
        # A worker per core: one compute thread each, and for the processes it starts, rather than two
        # OpenMP pools of two threads contending for the same two cores.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the markers into the scheduling groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as the README's command runs), keep the tests that share a
    module-scoped fixture (a training run, the GPU script's dry run, a private SLURM) on one worker, so the
    fixture is built once rather than once per worker; every other test goes wherever a worker is free."""
    for item in items:
        shared = sorted(
            name for name, defs in item._fixtureinfo.name2fixturedefs.items() if defs[-1].scope == "module"
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{'+'.join(shared)}"))


# The tiny UNet's shape: 8 px, two levels, attention at 4 px.
TINY_SHAPE = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_heads=2,
    noise_schedule="cosine",
)
# One level, attention at 8 px: the tiny UNet with the fewest layers and GroupNorm shapes, for tests whose
# cost grows with the graph (the Triton interpreter, seconds per shape; inductor's code generation).
ONE_LEVEL = dict(channel_mult="1", attention_resolutions="8")


def copy_checkpoint(src_run, dst_run, step: int) -> None:
    """Put src_run's checkpoint of `step` and the weights files saved with it into dst_run (pathlib paths):
    dst_run is then the run directory as it stood at that step, for a run that resumes from it."""
    tag = f"{step:06d}"
    shutil.copytree(src_run / "checkpoints" / f"step{tag}", dst_run / "checkpoints" / f"step{tag}")
    for f in src_run.glob(f"*_{tag}.pt"):
        shutil.copy(f, dst_run)


def tiny_flags(**overrides):
    """Model flags of a UNet small enough for CPU tests (TINY_SHAPE, 20 diffusion steps)."""
    flags = model_and_diffusion_defaults()
    flags.update(TINY_SHAPE, diffusion_steps=20, use_fused_kernels=False)
    flags.update(overrides)
    return flags


def tiny_cli(**flags) -> list:
    """The entry points' command line for TINY_SHAPE plus flags: ["--image_size", "8", ...]."""
    return [token for key, value in {**TINY_SHAPE, **flags}.items() for token in (f"--{key}", str(value))]


# The tiny super-resolution UNet's command line: 8 -> 16 px, two levels, attention at 8 px.
TINY_SR_CLI = (
    "--large_size 16 --small_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 8 --diffusion_steps 20 --noise_schedule cosine"
).split()


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
