"""Used by test_faults: launch/train.py whose disk 'fills up' while saving the checkpoint of step
$FAIL_AT_STEP."""

import errno
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
fail_tag = f"step{int(os.environ['FAIL_AT_STEP']):06d}"
real_save = torch.save


def save(obj, f, *args, **kwargs):
    if fail_tag in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return real_save(obj, f, *args, **kwargs)


torch.save = save
sys.argv = [os.path.join(ROOT, "launch", "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
