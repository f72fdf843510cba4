"""What a training run reports, and nothing it changes: the per-interval loss records (the console and
log.txt line, progress.jsonl, TensorBoard), the bytes each rank holds, compilation and recompilation, and the
EMA weights' sample previews and quality metrics. TrainLoop (train_util.py) feeds it.

Losses are summed on the device as they come (no host sync) and all-reduced once per --log_interval.
"""

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:  # imported where the engine is built: DeepSpeed picks its accelerator on import
    import deepspeed

log = logging.getLogger("iddpm_ds")

# The numbers of a progress record that make the console and log.txt line, in this order.
LOG_LINE_KEYS = ("loss", "mse", "vb", "grad_norm", "lr", "loss_scale")


def format_record(record: Dict[str, float]) -> str:
    """One compact line of a progress record, as improved-diffusion's logger prints its table."""
    parts = [f"step {record['step']}"]
    parts += [f"{k} {record[k]:.4g}" for k in LOG_LINE_KEYS if k in record]
    parts.append(f"{record['images_per_s']:.1f} img/s")
    if "max_memory_gb" in record:
        parts.append(f"peak {record['max_memory_gb']:.1f} GB")
    return " | ".join(parts)


def loss_scale_of(engine: "deepspeed.DeepSpeedEngine") -> Optional[float]:
    for owner, attr in (
        (engine.optimizer, "cur_scale"),
        (getattr(engine.optimizer, "loss_scaler", None), "cur_scale"),
        (engine.optimizer, "loss_scale"),
    ):
        value = getattr(owner, attr, None) if owner is not None else None
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    return None


def tensor_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(engine: "deepspeed.DeepSpeedEngine", ema_shadows: Iterable[torch.Tensor]) -> Dict[str, int]:
    """Bytes this rank holds: module parameters (its ZeRO-3 partition at stage 3), fp32 master copies not
    shared with them plus Adam moments, and the EMA shadows."""
    module = list(engine.module.parameters())
    module_ptrs = {p.data_ptr() for p in module}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # ZeRO-3 swaps its flat fp32 partitions out of param_groups between steps; they stay listed here.
    masters = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        p for g in inner.param_groups for p in g["params"] if p.data_ptr() not in module_ptrs
    ]
    moments = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "params": tensor_bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module),
        "optimizer": tensor_bytes(masters) + tensor_bytes(moments),
        "ema": tensor_bytes(ema_shadows),
    }


class TrainLog:
    """The reports of one training run on `engine`.

    :param num_timesteps: T of the diffusion, for the per-quartile losses.
    :param data: the DataStream (its skipped-image count and epoch go into the records).
    :param writer: a TensorBoard SummaryWriter on rank 0, or None.
    :param preview_fn: EMA state_dict -> uint8 HWC grid for TensorBoard (rank 0), or None.
    :param eval_fn: EMA state_dict -> metrics (rank 0), or None.
    """

    def __init__(
        self,
        engine: "deepspeed.DeepSpeedEngine",
        num_timesteps: int,
        data,
        run_dir: str,
        writer=None,
        preview_fn: Optional[Callable[[Dict[str, torch.Tensor]], np.ndarray]] = None,
        eval_fn: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, float]]] = None,
    ):
        self.engine, self.num_timesteps, self.data, self.run_dir = engine, num_timesteps, data, run_dir
        self.writer, self.preview_fn, self.eval_fn = writer, preview_fn, eval_fn
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), engine.device
        self._stats: Dict[str, torch.Tensor] = {}
        self._t_last, self._samples_last = time.perf_counter(), 0
        self._graphs_after_first_step: Optional[int] = None
        self._recompiles_reported = 0

    def start(self) -> None:
        """Start the images/s clock (at the loop's start, after any resume)."""
        self._t_last, self._samples_last = time.perf_counter(), self.engine.global_samples

    def accumulate(self, losses: Dict[str, torch.Tensor], t: torch.Tensor) -> None:
        """Sum each loss [N] and its four timestep quartiles locally (no host sync)."""
        quartile = (4 * t // self.num_timesteps).clamp(max=3)
        for key, values in losses.items():
            v = values.to(torch.float64)
            sums = torch.zeros(10, dtype=torch.float64, device=v.device)
            sums[0], sums[1] = v.sum(), v.numel()
            sums[2:6] = torch.bincount(quartile, weights=v, minlength=4)[:4]
            sums[6:10] = torch.bincount(quartile, minlength=4)[:4].to(torch.float64)
            self._stats[key] = self._stats.get(key, 0) + sums

    def first_step(self, seconds: float, ema_shadows: Iterable[torch.Tensor]) -> None:
        """After the first step (the optimizer holds its moments only once it has stepped): each rank's bytes,
        and the compilation's graphs and time. Collective."""
        per_rank = [None] * self.world
        dist.all_gather_object(per_rank, state_bytes(self.engine, ema_shadows))
        for rank, b in enumerate(per_rank):
            log.info(
                "rank %d holds: params %.1f MB | fp32 master + Adam moments %.1f MB | EMA %.1f MB",
                rank,
                b["params"] / 2**20,
                b["optimizer"] / 2**20,
                b["ema"] / 2**20,
            )
        self._graphs_after_first_step = self.compiled_graphs()
        if self._graphs_after_first_step is not None:
            log.info(
                "compiled the UNet (%d graphs) in the first step: %.1f s",
                self._graphs_after_first_step,
                seconds,
            )

    def compiled_graphs(self) -> Optional[int]:
        """Graphs torch.compile has built in this process so far, or None when the UNet is not compiled."""
        if not self.engine.is_compiled:
            return None
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def record(
        self, step: int, nonfinite_steps: int, grad_norm: Optional[float]
    ) -> Optional[Dict[str, float]]:
        """All-reduce the accumulated losses and write one record (rank 0; others get None). Collective.

        :param grad_norm: the loop's own global gradient norm, where DeepSpeed reports none.
        """
        keys = sorted(self._stats)
        # Collectives take tensors on this rank's device: NCCL has no CPU tensors.
        stacked = (
            torch.stack([self._stats[k] for k in keys])
            if keys
            else torch.zeros(0, 10, dtype=torch.float64, device=self.device)
        )
        self._stats = {}
        if self.world > 1:
            dist.all_reduce(stacked)
            skipped_data = torch.tensor([float(self.data.skipped)], dtype=torch.float64, device=self.device)
            dist.all_reduce(skipped_data)
            data_skips = int(skipped_data.item())
        else:
            data_skips = self.data.skipped
        if self.rank != 0:
            return None
        now = time.perf_counter()
        samples = self.engine.global_samples
        record = {"step": step, "samples": samples}
        for k, row in zip(keys, stacked.tolist()):
            record[k] = row[0] / max(row[1], 1)
            for q in range(4):
                if row[6 + q]:
                    record[f"{k}_q{q}"] = row[2 + q] / row[6 + q]
        reported = self.engine.get_global_grad_norm()
        grad_norm = reported if reported is not None else grad_norm
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record["lr"] = float(self.engine.get_lr()[0])
        scale = loss_scale_of(self.engine) if self.engine.fp16_enabled() else None  # bf16/fp32 report 1
        if scale is not None:
            record["loss_scale"] = scale
        record["skipped_steps"] = int(self.engine.skipped_steps)
        record["nonfinite_steps"] = nonfinite_steps
        record["data_skipped"] = data_skips
        record["epoch"] = self.data.epoch
        graphs = self.compiled_graphs()
        if graphs is not None and self._graphs_after_first_step is not None:
            # Fixed shapes compile once; a graph built after the first step means a recompilation.
            record["recompiles"] = graphs - self._graphs_after_first_step
            if record["recompiles"] > self._recompiles_reported:
                log.warning(
                    "the compiled UNet was rebuilt %d times since the first step: its input shapes or dtypes "
                    "changed between steps",
                    record["recompiles"],
                )
                self._recompiles_reported = record["recompiles"]
        if self.device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        record["images_per_s"] = (samples - self._samples_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._samples_last = now, samples
        self._append(record)
        log.info(format_record(record))
        self._scalars("train", record, step)
        return record

    def preview(self, step: int, label: str, state_dict: Dict[str, torch.Tensor]) -> None:
        """A small grid sampled from the EMA weights into TensorBoard (rank 0)."""
        if self.rank == 0 and self.preview_fn is not None and self.writer is not None:
            self.writer.add_image(
                f"samples/ema_{label}", self.preview_fn(state_dict), step, dataformats="HWC"
            )
            self.writer.flush()

    def evaluate(
        self, step: int, label: str, state_dict: Dict[str, torch.Tensor]
    ) -> Optional[Dict[str, float]]:
        """Sample-quality metrics of the EMA weights, logged (rank 0; others get None)."""
        if self.rank != 0 or self.eval_fn is None:
            return None
        start = time.perf_counter()
        metrics = self.eval_fn(state_dict)
        seconds = time.perf_counter() - start
        self._append({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        summary = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("eval step %d | ema %s | %s | %.1f s", step, label, summary, seconds)
        self._scalars("eval", {"step": step, **metrics}, step)
        # Sampling is not training: keep it out of the next interval's images/s.
        self._t_last += seconds
        return metrics

    def _append(self, record: Dict) -> None:
        with open(os.path.join(self.run_dir, "progress.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _scalars(self, group: str, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if k != "step":
                    self.writer.add_scalar(f"{group}/{k}", v, step)
            self.writer.flush()
