"""Optimizers over an Offload's parameters.

AdamW / Adam are torch.optim.Optimizer subclasses (so lr schedulers, param
groups and `optimizer.param_groups[k]["lr"]` work as with torch's) whose
step is ztier's pipelined one: the state (fp32 master weights and both
moments) on the config's optimizer tier, streamed through in sub-groups.
PartitionOptimizer runs a stock torch optimizer over this rank's partitions
instead (its state in host memory).
"""

from __future__ import annotations

import inspect
from typing import Dict, List

import torch
from torch import nn

from ztier._capi import OptimizerKind, StateArray

_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction")
# torch.optim.Optimizer.zero_grad's default (False in torch 1.x, True from 2.0).
_ZERO_GRAD_DEFAULT = inspect.signature(torch.optim.Optimizer.zero_grad).parameters[
    "set_to_none"].default


class AdamW(torch.optim.Optimizer):
    """AdamW run by ztier, bit for bit torch.optim.AdamW's arithmetic on the
    CPU. `params` as torch's (an iterable of parameters or of dicts, each a
    parameter group with its own hyperparameters); default: every parameter
    of the model that requires a gradient. Parameters left out have no
    optimizer state and are never updated. step(): gradients to ztier, the
    optimizer step, step end."""

    _kind = OptimizerKind.ADAMW

    def __init__(self, off, params=None, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, bias_correction: bool = True, overlap="auto",
                 **ignored):
        if amsgrad or maximize:
            raise ValueError("ztier.torch: amsgrad and maximize are not supported by ztier's "
                             "optimizer; use off.optimizer(torch.optim.AdamW, ...) for them")
        unknown = set(ignored) - {"foreach", "capturable", "differentiable", "fused"}
        if unknown:
            raise TypeError(f"ztier.torch: unexpected optimizer arguments {sorted(unknown)}")
        self.off = off
        if params is None:
            params = [p for p in off.model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)
        members: Dict[int, int] = {}
        for k, group in enumerate(self.param_groups):
            for p in group["params"]:
                members[off.slot_of(p).pid] = k
        off.engine.optimizer_create_groups(self._kind, self._hypers(), members)
        self._members = set(members)
        # Overlap: the step begins when the backward that completes its
        # gradients starts (the last one before step(), as the previous step
        # counted them), and each gradient is handed in as soon as it is
        # accumulated. step() checks that nothing changed since (the
        # hyperparameters, every gradient's tensor and version: clipping or
        # another accumulation are seen) and else runs the whole step again,
        # so results are the same either way. "auto": on with a CUDA device,
        # where backward leaves the CPU to the optimizer; off on the host
        # emulation, where it measured slower (docs/torch.md). One rank
        # only: with several, the ranks agree on which gradients exist only
        # after backward.
        if overlap == "auto":
            overlap = off._cuda
        self._overlap = bool(overlap) and off.world_size == 1
        self._backwards = 0          # backward passes since the last step
        self._expected = None        # backward passes the last step had
        self._begun = False
        self._begun_with = None      # the hyperparameters it began with
        self._redone = False         # the begun step was dropped (runs whole)
        self._handed = {}            # pid -> (id(grad), grad._version) handed in early
        self.last_step_overlapped = False
        off._optimizer = self

    def _hypers(self) -> List[dict]:
        return [{k: g[k] for k in _HYPER_KEYS} for g in self.param_groups]

    # ---- overlap (called by the Offload's hooks) ----
    def _backward_started(self) -> None:
        self._backwards += 1
        if self._overlap and not self._begun and self._backwards == self._expected:
            self._begun_with = self._hypers()
            self.off.engine.optimizer_step_begin(self._kind, self._begun_with)
            self._begun = True

    def _gradient_ready(self, slot) -> None:
        if not self._begun or slot.pid not in self._members:
            return
        g = slot.param.grad
        if g is not None:
            self._handing_in(slot.pid)
            self.off.hand_in(slot, g)
            self._handed[slot.pid] = (id(g), g._version)

    def _handing_in(self, pid: int) -> None:
        """A gradient goes to ztier: a second one for a parameter the begun
        step took makes the engine drop that step (it runs again whole)."""
        if pid in self._handed:
            self._redone = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        off = self.off
        try:
            off.finish_backward()
            hypers = self._hypers()
            if self._begun:
                self._redone |= hypers != self._begun_with
                off.engine.optimizer_step_finish(self._kind, hypers)
            else:
                off.engine.optimizer_step_groups(self._kind, hypers)
            # Whether the work begun during backward was used (not redone).
            self.last_step_overlapped = self._begun and not self._redone
        except BaseException:
            if self._begun:  # e.g. a gradient hand-in failed: nothing half-begun stays
                off.engine.optimizer_step_cancel()
            raise
        finally:
            self._expected, self._backwards = self._backwards, 0
            self._begun = self._redone = False
            self._handed = {}
        off.engine.grad_clear()
        off.engine.step_end()
        return loss

    def state_of(self, param: nn.Parameter) -> Dict[str, torch.Tensor]:
        """This rank's partition of `param`'s optimizer state (flat, padded):
        master, exp_avg, exp_avg_sq, as of the last step."""
        slot = self.off.slot_of(param)
        n = self.off.engine.param_info(slot.pid).partition_numel
        out = {}
        for name, array in (("master", StateArray.MASTER), ("exp_avg", StateArray.EXP_AVG),
                            ("exp_avg_sq", StateArray.EXP_AVG_SQ)):
            buf = torch.empty(n, dtype=torch.float32)
            self.off.engine.optimizer_state_read(slot.pid, array, buf)
            out[name] = buf
        return out

    def stats(self) -> dict:
        return self.off.engine.optimizer_stats()


class Adam(AdamW):
    """As AdamW, with torch.optim.Adam's L2 weight decay (default 0)."""

    _kind = OptimizerKind.ADAM

    def __init__(self, off, params=None, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, **kwargs):
        super().__init__(off, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, **kwargs)


class PartitionOptimizer:
    """A stock torch optimizer over this rank's partitions (flat, with
    padding). step(): gradients to ztier, then for each parameter with a
    gradient read its partition and gradient partition, update, write
    back; then step end."""

    def __init__(self, off, optimizer_class, **kwargs):
        self.off = off
        self._parts = [nn.Parameter(torch.empty(0)) for _ in off._slots]
        self.inner = optimizer_class(self._parts, **kwargs)

    def zero_grad(self, set_to_none: bool = _ZERO_GRAD_DEFAULT) -> None:
        """As torch.optim.Optimizer.zero_grad (the same default)."""
        self.off.model.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        off = self.off
        off.finish_backward()
        for slot, part in zip(off._slots, self._parts):
            info = off.engine.param_info(slot.pid)
            if not info.has_grad:
                continue  # no gradient this step: torch's optimizers skip it
            data = torch.empty(info.partition_numel, dtype=slot.dtype)
            grad = torch.empty(info.partition_numel, dtype=slot.dtype)
            off.engine.partition_read(slot.pid, data)
            off.engine.grad_partition_read(slot.pid, grad)
            part.data = data
            part.grad = grad
            self.inner.step()  # only this partition has a gradient
            off.engine.partition_write(slot.pid, part.data)
            part.data = torch.empty(0)
            part.grad = None
        off.engine.grad_clear()
        off.engine.step_end()
