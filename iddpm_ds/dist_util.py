"""Process-group set-up for every launcher: deepspeed (its own runner or --launcher slurm), torchrun, srun,
mpirun (mpi4py), or a bare python.

Call `setup_dist` before building the engine. Rank and world size come from
the launcher's environment (RANK/WORLD_SIZE, as deepspeed and torchrun set them), else from SLURM's for a
task that srun started, else, under mpirun, from MPI, as improved-diffusion's dist_util did.
"""

import os
import re
import socket
import sys
import time
import warnings
from typing import List, Optional, Tuple

import torch

from .errors import ConfigError

MPI_ENV_KEYS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")

if not torch.cuda.is_available():
    # Said before anything imports DeepSpeed, which would otherwise guess the accelerator and warn
    # on every rank that it picked the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def launched_by_srun() -> bool:
    """A task of a SLURM job step (srun), not the batch script itself (which has no step)."""
    return "SLURM_STEP_ID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ


def launched_by_mpi() -> bool:
    return any(k in os.environ for k in MPI_ENV_KEYS) and "RANK" not in os.environ and not launched_by_srun()


def env_rank() -> int:
    """This process's rank as its launcher's environment says, before any process group exists (0 alone)."""
    keys = ("RANK", "SLURM_PROCID" if launched_by_srun() else "", *MPI_ENV_KEYS[:3])
    return next((int(os.environ[k]) for k in keys if k in os.environ), 0)


def launched() -> bool:
    """Whether a launcher started this process as one rank of several (or of one)."""
    return "RANK" in os.environ or launched_by_srun() or launched_by_mpi()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[003-005,9],cpu1" -> "gpu003"."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    prefix, ranges, suffix = m.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "") + suffix


def tasks_per_node(spec: str) -> List[int]:
    """SLURM's tasks-per-node list expanded: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def srun_port(job_id: int, restart: int = 0) -> int:
    """The rendezvous port of a SLURM job's allocation: from its id, so two jobs sharing a node do not
    collide, and its restart count, so a requeued job does not meet its previous allocation's socket (seconds
    old, maybe still held); below Linux's ephemeral ports (32768 and up), where a client could hold it."""
    return 12000 + (16 * job_id + restart % 16) % 20000


def environment_from_srun() -> None:
    """For a task srun started: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    from SLURM's variables (what torch.distributed reads), where the environment does not set them."""
    env = os.environ
    local_sizes = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
    node = int(env.get("SLURM_NODEID", 0))
    for key, value in (
        ("RANK", env["SLURM_PROCID"]),
        ("WORLD_SIZE", env["SLURM_STEP_NUM_TASKS"]),
        ("LOCAL_RANK", env.get("SLURM_LOCALID", "0")),
        ("LOCAL_WORLD_SIZE", str(local_sizes[min(node, len(local_sizes) - 1)])),
        (
            "MASTER_ADDR",
            first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))),
        ),
        (
            "MASTER_PORT",
            str(srun_port(int(env.get("SLURM_JOB_ID", 0)), int(env.get("SLURM_RESTART_COUNT", 0)))),
        ),
    ):
        env.setdefault(key, value)


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

    :param master_port: rendezvous port for mpirun, srun and bare-python runs
        (deepspeed/torchrun launchers set their own); default 29500 under
        mpirun, one derived from the job id under srun, a free port for a single process.
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
    if "RANK" not in os.environ and launched_by_srun():
        if master_port:
            os.environ.setdefault("MASTER_PORT", str(master_port))
        environment_from_srun()
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
    if not launched():
        return 0, 1, False
    setup_dist(master_port)
    set_threads_per_rank()
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), True


def close() -> None:
    """Close this rank's process-group connections, waiting for no other rank: a process that exits while
    gloo's and the rendezvous store's threads still run can abort ("terminate called without an active
    exception", status -6) after it has said why it stops."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shutdown() -> None:
    """Leave the process group together at the end of a successful run: every rank waits for the others (so
    rank 0's outputs exist once the job reports success), then closes its connections."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        close()


def local_world_size() -> int:
    keys = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
    for key in keys:
        if key in os.environ:
            return int(os.environ[key])
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def set_threads_per_rank() -> int:
    """Split the cores between this host's ranks, unless the user set OMP_NUM_THREADS or SLURM gave each
    task its CPUs (SLURM_CPUS_PER_TASK)."""
    if "OMP_NUM_THREADS" in os.environ:
        threads = int(os.environ["OMP_NUM_THREADS"])
    elif "SLURM_CPUS_PER_TASK" in os.environ and launched_by_srun():
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
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
