"""Graceful stop on preemption: a signal to any rank, or the launcher going away, ends the run
after the current step with a complete checkpoint.

Cluster schedulers announce preemption with SIGTERM (or SIGUSR1 ahead of a time
limit) to some or all processes. The handler only sets a flag; the training
loop all-reduces it once per step, so every rank stops after the same step.
A rank also treats the death of a launcher process above it (deepspeed,
mpirun/hydra, torchrun) as a stop request, since a signal that killed the
launcher may never reach the ranks.
"""

import os
import signal
import time
from typing import List, Tuple

# train.py's exit status after such a stop: sysexits' EX_TEMPFAIL, "try again" (a batch script requeues).
STOPPED_EARLY = 75

LAUNCHER_NAMES = ("deepspeed", "mpirun", "mpiexec", "hydra_pmi_proxy", "torchrun", "torch.distributed.run")


class PreemptionWatch:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signal_received = None
        self.signals = signals
        for sig in signals:
            signal.signal(sig, self._handler)
        self.launchers = self._launcher_ancestors()
        self._launchers_seen = -1.0

    def _handler(self, signum, frame):
        self.signal_received = signal.Signals(signum).name

    @staticmethod
    def _launcher_ancestors() -> List[Tuple[int, float]]:
        """(pid, create_time) of launcher processes above this one."""
        import psutil

        found = []
        proc = psutil.Process(os.getpid()).parent()
        while proc is not None and proc.pid > 1:
            try:
                cmdline = " ".join(proc.cmdline())
                if any(name in cmdline for name in LAUNCHER_NAMES):
                    found.append((proc.pid, proc.create_time()))
                proc = proc.parent()
            except psutil.Error:
                break
        return found

    def stand_down(self) -> None:
        """Once the stop's checkpoint is complete: ignore these signals from now on. A launcher ends the ranks
        still exiting when the first one exits (srun --kill-on-bad-exit, deepspeed), and a SIGTERM during the
        interpreter's shutdown (which drops Python's handlers) would turn a clean stop into a death by signal,
        exit status 143 instead of 75."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def reason(self) -> str:
        """Why this rank wants to stop ('' = it does not). The launchers are looked at once a second at most
        (asked every step, each look is a few system calls per launcher)."""
        if self.signal_received:
            return f"received {self.signal_received}"
        now = time.monotonic()
        if now - self._launchers_seen < 1.0:
            return ""
        self._launchers_seen = now
        import psutil

        for pid, created in self.launchers:
            try:
                proc = psutil.Process(pid)
                # A killed launcher stays a zombie until its parent reaps it: that is gone too.
                alive = proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return f"launcher process {pid} is gone"
        return ""
