"""One writer per run directory.

Two trainings writing one run directory (a job launched twice by mistake, ranks that did not find each
other and each think they are rank 0, a requeued job overlapping its predecessor) would interleave
checkpoints and logs without a word. Rank 0 of a run therefore holds an exclusive lock on RUN_DIR/.lock for
as long as it runs, and writes who it is (host, pid, SLURM job, start time) into the file. The lock is the
kernel's (flock; on NFS the server's), so it ends with its holder's process, however that ends (SIGKILL, a
crash), and forked children (data loader workers) do not carry it: a dead holder never keeps a run
directory.
"""

import datetime
import fcntl
import json
import os
import socket
from typing import IO, Optional

from .errors import ConfigError

LOCK_FILE = ".lock"


def holder_text(info: dict) -> str:
    """'host H, pid P, SLURM job J, since T' from what a holder wrote."""
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job"):
        parts.append(f"SLURM job {info['slurm_job']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return ", ".join(parts)


class RunLock:
    """Held from acquire() until release() or the end of the process."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file: Optional[IO[str]] = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the live holder."""
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = holder_text(json.loads(f.read()))
            except ValueError:  # the holder is still writing its name
                holder = "a process that has just started"
            f.close()
            raise ConfigError(
                f"{os.path.dirname(self.path)} is being written by another live training ({holder}): wait "
                "for it to end or stop it, or give this run another --log_dir"
            ) from None
        f.seek(0)
        f.truncate()
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        f.write(json.dumps(info))
        f.flush()
        self._file = f
        # A forked child (a data loader worker) shares the lock's open file; if it kept its copy, an orphaned
        # worker would hold the lock after its trainer died. Children close theirs; the lock stays ours.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        if self._file is not None:
            self._file.close()  # the child's copy only: the parent's lock is untouched
            self._file = None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
