"""Process-group set-up for every launcher: deepspeed, mpirun (mpi4py), torchrun, or a bare python.

Call `setup_dist` before building the engine. Rank and world size come from
the launcher's environment (RANK/WORLD_SIZE) or, under mpirun, from MPI, as
improved-diffusion's dist_util did.
"""

import os
import socket
import sys
import time
import warnings
from typing import Optional, Tuple

import torch

from .errors import ConfigError

MPI_ENV_KEYS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")

if not torch.cuda.is_available():
    # Said before anything imports DeepSpeed, which would otherwise guess the accelerator and warn
    # on every rank that it picked the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def launched_by_mpi() -> bool:
    return any(k in os.environ for k in MPI_ENV_KEYS) and "RANK" not in os.environ


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerator_is_cpu() -> bool:
    return not torch.cuda.is_available()


def native_bf16() -> bool:
    """Whether the device computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AMX-BF16 or
    AVX512-BF16 (read from /proc/cpuinfo; elsewhere oneDNN emulates bf16, slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def setup_dist(master_port: Optional[int] = None) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU).

    :param master_port: rendezvous port for mpirun and bare-python runs
        (deepspeed/torchrun launchers set their own); default 29500 under
        mpirun, a free port for a single process.
    """

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module object is needed below)

    if torch.distributed.is_initialized():
        return
    if accelerator_is_cpu():
        # The shm all-reduce op is JIT-built (~1 min, needs a compiler) but only serves inference.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    # DeepSpeed's ZeRO calls torch's deprecated collective names; the warning is for DeepSpeed, not our users.
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f".*{name}` is deprecated", category=FutureWarning)
    backend = "gloo" if accelerator_is_cpu() else "nccl"
    if "RANK" in os.environ:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    elif launched_by_mpi():
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=True, distributed_port=master_port or 29500
        )
    else:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(master_port or free_port()),
        )
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    check_slots()
    if not accelerator_is_cpu():
        # NCCL collectives (barrier, all_gather_object) run on the current CUDA device: without this every
        # rank of a tool that builds no DeepSpeed engine (sampling, evaluation) would use GPU 0. LOCAL_RANK is
        # known only now under mpirun (DeepSpeed's MPI discovery sets it).
        torch.cuda.set_device(dev())


def check_slots() -> None:
    """A host must not run more ranks (its hostfile slots) than it has GPUs; on CPUs it only slows down."""
    ranks = local_world_size()
    if not accelerator_is_cpu() and ranks > torch.cuda.device_count():
        raise ConfigError(
            f"host {socket.gethostname()} runs {ranks} ranks (its hostfile slots) but has "
            f"{torch.cuda.device_count()} GPUs: lower its slots"
        )
    if accelerator_is_cpu() and ranks > (os.cpu_count() or 1):
        warnings.warn(
            f"host {socket.gethostname()} runs {ranks} ranks on {os.cpu_count()} CPUs: they will share cores"
        )


def setup_if_launched(master_port: Optional[int] = None) -> Tuple[int, int, bool]:
    """For tools that also run as one plain process (sampling, evaluation): join the process
    group only when a launcher started this process. Returns (rank, world_size, distributed)."""
    if "RANK" not in os.environ and not launched_by_mpi():
        return 0, 1, False
    setup_dist(master_port)
    set_threads_per_rank()
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), True


def shutdown() -> None:
    """Leave the process group together at the end of a successful run.

    Every rank waits for the others (so rank 0's outputs exist once the job
    reports success), then closes its connections: a rank that exits while
    gloo's threads still run can abort ("terminate called without an active
    exception") and fail a job that had finished.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def local_world_size() -> int:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def set_threads_per_rank() -> int:
    """Split the cores between this host's ranks, unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size()))
    torch.set_num_threads(threads)
    return threads


def abort_all_ranks_on_error() -> None:
    """Under mpirun, make an exception on one rank end the job at once instead of
    leaving the other ranks blocked in a collective until its timeout."""
    if not launched_by_mpi():
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
        print(
            f"rank {rank} failed ({exc_type.__name__}: {exc}); aborting all ranks",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(1)  # let mpirun forward the message before the abort tears the job down
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook


def dev() -> torch.device:
    """The device for this rank's tensors."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")
