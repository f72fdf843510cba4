"""Used by test_engine: under mpirun, rank 1 raises while rank 0 waits in a collective."""

import sys

import torch.distributed as dist

from iddpm_ds import dist_util

dist_util.abort_all_ranks_on_error()
dist_util.setup_dist(int(sys.argv[1]))
if dist.get_rank() == 1:
    raise RuntimeError("boom on rank 1")
dist.barrier()  # would wait for the gloo timeout (30 min) without the abort
