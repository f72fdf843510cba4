"""Upsample low-resolution samples with a super-resolution model: sample.py with improved-diffusion's SR
flags.

    python launch/super_res_sample.py --run_dir runs/sr --base_samples runs/base/samples_64x64x64x3.npz

--base_samples is an .npz from sample.py (arr_0 uint8 NHWC at small_size;
its arr_1 labels are used for class-conditional models).
"""

from sample import cli

if __name__ == "__main__":
    cli(super_res=True)
