"""Train a super-resolution IDDPM UNet (SuperResModel): train.py with improved-diffusion's SR flags.

    deepspeed --num_gpus 2 launch/super_res_train.py --deepspeed_config ds_configs/zero2.json --large_size
    256 --small_size 64 ...

The data are the large images; each batch's low-resolution condition is the
same batch area-downsampled to --small_size. Everything else (engine, data,
checkpoints, resume, launchers) is launch/train.py's.
"""

from train import cli

if __name__ == "__main__":
    cli(super_res=True)
