"""Launching on a cluster: the hostfile preflight names each host's problem in one line, a rank whose
Python lacks the package stops in one line, and (where this machine allows: root, ip netns, sshd, pdsh)
the user's `deepspeed --hostfile hosts launch/train.py ...` reaches two ssh hosts and resumes."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stands in for ssh: host "down" refuses the connection, host "bare" has a Python without DeepSpeed,
# any other host runs the remote command here.
FAKE_SSH = """#!/usr/bin/env bash
while [[ $1 == -o ]]; do shift 2; done
host=$1; shift
case $host in
  down) echo "ssh: connect to host down port 22: Connection refused" >&2; exit 255 ;;
  bare) PYTHONPATH={shadow} exec bash -c "$*" ;;
  *) exec bash -c "$*" ;;
esac
"""


def hide_module(folder, name):
    """A folder that, first on PYTHONPATH, makes `import name` fail as if name were not installed."""
    os.makedirs(folder / name)
    (folder / name / "__init__.py").write_text(
        f'raise ModuleNotFoundError("No module named {name}", name="{name}")\n'
    )
    return folder


def test_check_hosts_names_each_hosts_problem_and_passes_a_good_one(tmp_path):
    shadow = hide_module(tmp_path / "shadow", "deepspeed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH.format(shadow=shadow))
    (bin_dir / "ssh").chmod(0o755)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"down slots=1\nbare slots=1\ngreedy slots={(os.cpu_count() or 1) + 1}\ngood slots=1\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "check_hosts.py"), str(hosts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not reachable over ssh" in lines["host down"] and "key-based ssh" in lines["host down"]
    assert "cannot import deepspeed" in lines["host bare"] and "bash setup.sh" in lines["host bare"]
    assert "lower its slots" in lines["host greedy"]
    assert lines["host good"] == "ok (1 slots)"
    assert proc.stderr.strip().splitlines()[-1].startswith("check_hosts.py: error: 3 host(s)")


def test_a_rank_whose_python_lacks_the_package_stops_in_one_line(tmp_path):
    shadow = hide_module(tmp_path / "shadow", "iddpm_ds")
    env = dict(os.environ, PYTHONPATH=str(shadow), DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "train.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("train.py: error:") and "cannot import iddpm_ds" in line and "setup.sh" in line


def cluster_capability() -> str:
    """'' if this machine can build the two ssh hosts, else what it lacks."""
    if os.geteuid() != 0:
        return "root (ip netns, sshd)"
    for tool in ("ip", "pdsh", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return tool
    if not os.path.exists("/usr/sbin/sshd"):
        return "sshd (openssh-server)"
    probe = subprocess.run(["ip", "netns", "add", "iddpm_probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "iddpm_probe"], capture_output=True)
    return "" if probe.returncode == 0 else "network namespaces (ip netns add)"


@pytest.mark.slow
def test_the_users_hostfile_command_reaches_two_ssh_hosts_and_resumes(tmp_path):
    missing = cluster_capability()
    if missing:
        pytest.skip(f"this machine lacks {missing}")
    if os.path.exists(os.path.join(ROOT, "hosts")) or os.path.exists(os.path.join(ROOT, ".deepspeed_env")):
        pytest.skip("the repository holds a hosts or .deepspeed_env of its own")
    run = tmp_path / "cluster"
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "netns_ssh_cluster.sh"), str(run), "tiny"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "host 10.77.0.1: ok" in out and "host 10.77.0.2: ok" in out  # the preflight over ssh
    assert out.count("Running on the following workers: 10.77.0.1,10.77.0.2") == 2  # pdsh to both hosts
    assert "2 ranks x 1 threads | rendezvous 10.77.0.1:29500" in out  # met over the veth address
    assert "done at step 3" in out and "resumed from" in out and "done at step 5" in out
    assert not os.path.exists(os.path.join(ROOT, "hosts"))  # the demo cleans up after itself
