from setuptools import find_packages, setup

setup(
    name="iddpm_ds",
    version="0.1.0",
    description="Improved DDPM (Nichol & Dhariwal 2021) training with DeepSpeed, Triton kernels and exact "
    "resume",
    packages=find_packages(include=["iddpm_ds", "iddpm_ds.*", "kernels", "kernels.*"]),
    python_requires=">=3.9",
    # torch is not pinned: a machine with a CUDA torch keeps it; setup.sh installs
    # the CPU build 2.13.0 from local disk where no torch is present.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "deepspeed==0.19.8",
        "mpi4py",
        "webdataset",
        "tensorboard",
        "triton",
        "pillow",
        "tqdm",
        "fonttools",
        "ninja",
    ],
    extras_require={
        # pytest 9.2 stops xdist 3.8's --dist loadgroup from grouping (pytest-xdist#1386): every shared
        # module fixture (GPU dry run, scenario runs) was then built once per worker.
        "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "ruff==0.17.6"],
        # fid/isc/kid/prc in launch/evaluate.py. torchvision must match torch: PyPI's Linux wheel is a CUDA
        # build that cannot load beside a CPU-only torch (the digit metrics need neither).
        "eval": ["torch-fidelity==0.4.0", "torchvision"],
    },
)
