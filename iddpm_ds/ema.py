"""Moving averages of the fp32 master weights, kept where DeepSpeed keeps the master: exponential ones at
fixed rates (improved-diffusion's --ema_rate) and power-function ones of a relative width (post-hoc EMA's
profiles, phema.py), each keyed by its name.

At ZeRO 1-3 each rank averages only its own shard of the fp32 master, so EMA
memory per rank falls as 1/ranks and an update needs no communication. At
ZeRO 0 the master (or DeepSpeed's fp32 copy under fp16/bf16) is replicated,
and so is the EMA. Consolidating to a full state_dict is collective.
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
from torch._utils import _unflatten_dense_tensors


def _fp16_master_map(engine) -> Dict[int, torch.Tensor]:
    """id(module param) -> its fp32 master for the ZeRO-0 fp16/bf16 wrappers: FP16_UnfusedOptimizer (a CPU or
    unfused optimizer) keeps one fp32 tensor per parameter; FP16_Optimizer (DeepSpeed's FusedAdam, i.e. on a
    GPU)
    one flat fp32 tensor per group, of which each parameter's master is a view."""
    opt = engine.optimizer
    groups16 = getattr(opt, "fp16_groups", None)
    groups32 = getattr(opt, "fp32_groups", None)
    if groups32 is None and getattr(opt, "fp32_groups_flat", None) is not None:
        groups32 = [_unflatten_dense_tensors(flat, g16) for flat, g16 in zip(opt.fp32_groups_flat, groups16)]
    if groups16 is None or groups32 is None:
        return {}
    return {id(p16): p32 for g16, g32 in zip(groups16, groups32) for p16, p32 in zip(g16, g32)}


class MasterWeights:
    """Per-parameter access to this rank's part of the fp32 master weights of a DeepSpeed engine."""

    def __init__(self, engine):
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        self.named: List[Tuple[str, torch.nn.Parameter]] = [
            (n, p) for n, p in engine.module.named_parameters() if p.requires_grad
        ]
        self._fp32_copy = _fp16_master_map(engine) if self.stage == 0 else {}
        if self.stage == 0 and self.named and self.named[0][1].dtype != torch.float32 and not self._fp32_copy:
            raise RuntimeError(
                f"cannot find the fp32 master weights of {type(engine.optimizer).__name__} at ZeRO stage 0"
            )

    @property
    def plain_fp32(self) -> bool:
        """ZeRO-0 without a reduced-precision wrapper: the module's parameters are the master."""
        return self.stage == 0 and not self._fp32_copy

    @property
    def sharded(self) -> bool:
        return self.stage > 0

    def local(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """A view of this rank's fp32 master elements of p (all of them at ZeRO 0), or None if it holds
        none."""
        if self.stage == 3:
            return safe_get_local_fp32_param(p)
        if self.stage > 0:
            mapping = getattr(p, "_hp_mapping", None)
            return None if mapping is None else mapping.get_hp_fragment()
        return self._fp32_copy.get(id(p), p)

    def shard_of(self, p: torch.nn.Parameter, full: torch.Tensor) -> Optional[torch.Tensor]:
        """This rank's part of a full tensor shaped like p, laid out like local(p). No communication."""
        local = self.local(p)
        if local is None:
            return None
        # A loaded state_dict is on the CPU; the master may not be.
        flat = full.detach().to(device=local.device, dtype=torch.float32).flatten()
        if self.stage == 3:
            n = p.ds_tensor.numel()
            r = dist.get_rank(group=p.ds_process_group)
            flat = torch.nn.functional.pad(
                flat, (0, n * dist.get_world_size(group=p.ds_process_group) - flat.numel())
            )
            return flat[n * r : n * (r + 1)].view_as(local).clone()
        if self.stage > 0:
            a = p._hp_mapping.lp_fragment_address
            return flat[a.start : a.start + a.numel].view_as(local).clone()
        return flat.view_as(local).clone()

    @torch.no_grad()
    def full_state_dict(self, replace: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Full fp32 tensors by parameter name; with `replace` (name -> local shard), those
        shards stand in for the master's. Collective at ZeRO 1-3: every rank must call it."""
        out = {}
        for name, p in self.named:
            local = self.local(p)
            swap = replace is not None and local is not None
            if swap:
                backup = local.clone()
                local.copy_(replace[name])
            if self.sharded:
                out[name] = safe_get_full_fp32_param(p).detach().clone().cpu()
            else:
                out[name] = local.detach().clone().float().cpu()
            if swap:
                local.copy_(backup)
        return out


Key = Union[float, str]  # an EMA rate, or profile_key(sigma_rel)


def profile_key(sigma_rel: float) -> str:
    """The key of the power-function average of relative width sigma_rel."""
    return f"sigma_rel={sigma_rel}"


class EMA:
    """One shadow copy of the master shard per average: per rate, theta_ema <- rate * theta_ema + (1 - rate)
    * theta at every update; per profile (post-hoc EMA's power function of width sigma_rel) the same with a
    decay that depends on the step, phema.beta(sigma_rel, step)."""

    def __init__(self, master: MasterWeights, rates: Sequence[float], profiles: Sequence[float] = ()):
        self.master = master
        self.rates = list(rates)
        self.profiles = list(profiles)
        self.shadow: Dict[Key, Dict[str, torch.Tensor]] = {}
        for key in self.keys():
            self.shadow[key] = {}
            for name, p in master.named:
                local = master.local(p)
                if local is not None:
                    self.shadow[key][name] = local.detach().clone()

    def keys(self) -> List[Key]:
        return [*self.rates, *map(profile_key, self.profiles)]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call once per applied optimizer step, `step` being the optimizer step just taken (1-based); no
        communication."""
        from .phema import beta

        decays = {**{r: r for r in self.rates}, **{profile_key(s): beta(s, step) for s in self.profiles}}
        names = list(self.shadow[self.keys()[0]])
        params = dict(self.master.named)
        current = [self.master.local(params[n]) for n in names]
        for key, decay in decays.items():
            torch._foreach_lerp_([self.shadow[key][n] for n in names], current, 1.0 - decay)

    def full_state_dicts(self) -> Dict[Key, Dict[str, torch.Tensor]]:
        """{key: full fp32 state_dict}. Collective at ZeRO 1-3."""
        return {key: self.master.full_state_dict(replace=self.shadow[key]) for key in self.keys()}

    def load_full(self, key: Key, state_dict: Dict[str, torch.Tensor]) -> None:
        """Set one average's shadow from a full state_dict (any world size); no communication."""
        for name, p in self.master.named:
            shard = self.master.shard_of(p, state_dict[name])
            if shard is not None:
                self.shadow[key][name] = shard
