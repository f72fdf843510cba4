"""Check a DeepSpeed hostfile before launching on it, one line per host.

    python launch/check_hosts.py hosts

For every host: reachable over ssh without a password (as DeepSpeed's runner and pdsh need), this
repository at the same path (DeepSpeed runs the same command there), this Python able to import
torch, DeepSpeed and iddpm_ds there, and its slots within its GPUs (or CPUs). Exits 2, after naming
every problem and its fix, if any host fails; DeepSpeed's runner would otherwise stop at the first
with a traceback, or start ranks that fail on the host that lacks something.
"""

import os
import shlex
import subprocess
import sys
from typing import List, Tuple

from iddpm_ds.flags import ConfigError, make_parser, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints "CPUS GPUS" where the stack imports; names the missing module where it does not.
PROBE = (
    "import os, sys\n"
    "try:\n"
    "    import torch, deepspeed, iddpm_ds\n"
    "except ModuleNotFoundError as e:\n"
    "    sys.exit('missing ' + str(e.name))\n"
    "print(os.cpu_count(), torch.cuda.device_count())"
)


def read_hostfile(path: str) -> List[Tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile ("host slots=N"; '#' starts a comment)."""
    if not os.path.isfile(path):
        raise ConfigError(f"hostfile not found: {path}")
    hosts = []
    for number, line in enumerate(open(path), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ConfigError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise ConfigError(f"{path} names no host")
    return hosts


def check_host(host: str, slots: int, timeout: int) -> str:
    """'' if host is ready for `slots` ranks, else the problem and its fix."""
    remote = f"cd {shlex.quote(REPO)} && {shlex.quote(sys.executable)} -c {shlex.quote(PROBE)}"
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", host, remote]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        return f"no answer over ssh within {timeout + 30} s"
    said = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode == 255:
        return (
            f"not reachable over ssh without a password ({said}): set up key-based ssh to it from this host"
        )
    if said.startswith("missing "):
        return (
            f"{sys.executable} there cannot import {said[8:]}: install the project for it (bash setup.sh), "
            "or put a Python that has it first in PATH in .deepspeed_env"
        )
    if proc.returncode != 0:
        return f"cannot run in {REPO} there ({said}): DeepSpeed runs the same path on every host"
    cpus, gpus = (int(x) for x in proc.stdout.split()[-2:])
    devices, kind = (gpus, "GPUs") if gpus else (cpus, "CPUs")
    if slots > devices:
        return f"slots={slots} but it has {devices} {kind}: lower its slots in the hostfile"
    return ""


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("hostfile", help="a DeepSpeed hostfile: one 'HOST slots=N' per line")
    parser.add_argument("--timeout", type=int, default=10, help="seconds to wait for each host's ssh")
    args = parser.parse_args()
    problems = 0
    for host, slots in read_hostfile(args.hostfile):
        problem = check_host(host, slots, args.timeout)
        problems += bool(problem)
        print(f"host {host}: {problem or f'ok ({slots} slots)'}")
    if problems:
        raise ConfigError(f"{problems} host(s) of {args.hostfile} are not ready; see the lines above")


if __name__ == "__main__":
    run_cli(main)
