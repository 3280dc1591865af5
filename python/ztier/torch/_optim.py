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
import math
import struct
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
                 keep_grads: bool = False, **ignored):
        if amsgrad or maximize:
            raise ValueError("ztier.torch: amsgrad and maximize are not supported by ztier's "
                             "optimizer; use off.optimizer(torch.optim.AdamW, ...) for them")
        unknown = set(ignored) - {"foreach", "capturable", "differentiable", "fused"}
        if unknown:
            raise TypeError(f"ztier.torch: unexpected optimizer arguments {sorted(unknown)}")
        self.off = off
        self._grad_scale = 1.0       # unscale x clip factor for the next step
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
        on_nvme = off.engine.grad_stats().on_nvme
        if overlap == "auto":
            overlap = off._cuda and not on_nvme
        elif overlap and on_nvme:
            raise ValueError("ztier.torch: overlap=True needs tiers.gradients: host (with "
                             "gradients on NVMe the step reads them back with its state)")
        self._overlap = bool(overlap) and off.world_size == 1
        # Streaming: each gradient goes to ztier (accumulated into its
        # partition) the moment backward completes it, and param.grad is
        # freed; keep_grads leaves param.grad in place until step() instead
        # (for code that reads or edits .grad between backward and step).
        self._stream = not keep_grads
        # torch's zero_grad(set_to_none=False) leaves a zero .grad on every
        # parameter that had one, and the next step updates it with that
        # zero gradient; streamed gradients leave .grad None, so these are
        # remembered and handed in as zeros when backward gives them none.
        self._streamed = set()       # pids streamed since the last zero_grad
        self._zero_grads = set()     # pids whose .grad torch would hold as zeros
        self._backwards = 0          # backward passes since the last step
        self._expected = None        # backward passes the last step had
        self._begun = False
        self._begun_with = None      # the hyperparameters it began with
        self._redone = False         # the begun step was dropped (runs whole)
        self._handed = {}            # pid -> (id(grad), grad._version) handed in early
        self.last_step_overlapped = False
        off._optimizer = self

    def _hypers(self) -> List[dict]:
        return [dict({k: g[k] for k in _HYPER_KEYS}, grad_scale=self._grad_scale)
                for g in self.param_groups]

    # ---- overlap (called by the Offload's hooks) ----
    def _backward_started(self) -> None:
        self._backwards += 1
        if self._overlap and not self._begun and self._backwards == self._expected:
            self._begun_with = self._hypers()
            self.off.engine.optimizer_step_begin(self._kind, self._begun_with)
            self._begun = True

    def _gradient_ready(self, slot) -> None:
        if slot.pid not in self._members:
            return
        g = slot.param.grad
        if g is None:
            return
        if self._stream:
            self._handing_in(slot.pid)
            self.off.hand_in(slot, g, accumulate=True)
            slot.param.grad = None  # its memory goes back now, not at step()
            self._streamed.add(slot.pid)
        elif self._begun:
            self._handing_in(slot.pid)
            self.off.hand_in(slot, g)
            self._handed[slot.pid] = (id(g), g._version)

    def _handing_in(self, pid: int) -> None:
        """A gradient goes to ztier: a second one for a parameter the begun
        step took makes the engine drop that step (it runs again whole)."""
        if pid in self._handed:
            self._redone = True

    def zero_grad(self, set_to_none: bool = _ZERO_GRAD_DEFAULT) -> None:
        """As torch's, and drops the gradients ztier holds (streamed ones)."""
        super().zero_grad(set_to_none=set_to_none)
        self.off.engine.grad_clear()
        self._grad_scale = 1.0
        self._zero_grads = set() if set_to_none else self._zero_grads | self._streamed
        self._streamed = set()

    def _hand_in_zero_grads(self) -> None:
        """The zero gradients torch would hold (see _zero_grads) for the
        parameters that got no gradient since."""
        off = self.off
        for slot in off._slots:
            if slot.pid in self._zero_grads and not off.engine.param_info(slot.pid).has_grad:
                off.hand_in(slot, torch.zeros(slot.numel, dtype=slot.dtype, device=off._device))

    def _global_grad_stats(self):
        """(sum of squares, any non-finite) over every rank's partitions."""
        st = self.off.engine.grad_stats()
        if self.off.world_size == 1:
            return st.sq_norm, st.nonfinite
        bits = struct.unpack("<Q", struct.pack("<d", st.sq_norm))[0]
        total = 0.0
        for v in self.off.engine.exchange_u64(bits):  # rank order: the same sum everywhere
            total += struct.unpack("<d", struct.pack("<Q", v))[0]
        return total, not math.isfinite(total)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over this optimizer's gradients,
        which ztier holds (param.grad is freed as they stream in): returns
        the total L2 norm over all ranks and scales the gradients of the
        next step() by max_norm / (norm + 1e-6) when that is below 1, as
        torch does, inside the step (no extra pass over the gradients). Call
        it between backward and step()."""
        if float(norm_type) != 2.0:
            raise ValueError("ztier.torch: clip_grad_norm_ supports the L2 norm (norm_type=2)")
        self.off.finish_backward()
        sq, _ = self._global_grad_stats()
        # float32 from here, as torch computes the norm and the coefficient.
        total = torch.tensor(math.sqrt(sq), dtype=torch.float32) * self._grad_scale
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"The total norm of order 2.0 for gradients is non-finite "
                               f"({float(total)}), so it cannot be clipped")
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        self._grad_scale *= float(coef)  # after an unscale: one factor for both
        return total

    def _unscale(self, inv_scale: float) -> bool:
        """For LossScaler: the next step's gradients are multiplied by
        inv_scale; returns whether any rank's gradients are non-finite."""
        self.off.finish_backward()
        self._grad_scale = inv_scale
        _, nonfinite = self._global_grad_stats()
        return nonfinite

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        off = self.off
        try:
            off.finish_backward()
            if self._zero_grads:
                self._hand_in_zero_grads()
            if not math.isfinite(self._grad_scale):
                raise FloatingPointError(
                    "ztier.torch: the gradients are inf or NaN (their clipping coefficient is "
                    f"{self._grad_scale}); the step would write NaN into every parameter. With "
                    "fp16 use ztier.torch.LossScaler, which skips such steps")
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
            self._grad_scale = 1.0
        off.engine.grad_clear()
        off.engine.step_end()
        return loss

    # ---- checkpoints (Offload.save_checkpoint / load_checkpoint) ----
    def _cancel_begun(self) -> None:
        """Drops a step begun during backward (a checkpoint cannot be saved
        while one is): step() then runs it whole, with the same result."""
        if self._begun:
            self.off.engine.optimizer_step_cancel()
        self._begun = self._redone = False
        self._begun_with = None
        self._handed = {}

    def _checkpoint_state(self) -> dict:
        """What this object keeps between steps beyond param_groups and the
        engine's state: the pending clip / unscale factor, the parameters
        whose zeroed .grad torch would still hold, the backward count that
        times the overlapped step."""
        return {"grad_scale": self._grad_scale, "zero_grads": sorted(self._zero_grads),
                "streamed": sorted(self._streamed), "backwards": self._backwards,
                "expected": self._expected}

    def _restore_checkpoint_state(self, state: dict) -> None:
        """After the engine loaded a checkpoint: nothing of the run before it
        stays (a begun step, gradients handed in, the factors)."""
        self._cancel_begun()
        state = state or {}
        self._grad_scale = float(state.get("grad_scale", 1.0))
        self._zero_grads = set(state.get("zero_grads", ()))
        self._streamed = set(state.get("streamed", ()))
        self._backwards = int(state.get("backwards", 0))
        self._expected = state.get("expected")
        self.last_step_overlapped = False

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
