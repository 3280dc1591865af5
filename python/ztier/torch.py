"""ztier.torch: train an nn.Module whose parameters live on ztier's tiers.

    model = GPT(...)
    off = ztier.torch.offload(model, "configs/default.yaml")
    opt = off.adamw(lr=1e-3)    # ztier's AdamW, its state on NVMe
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()          # gradients to ztier, partitions updated, step end
        opt.zero_grad()

What offload() does:
  - registers every parameter (its initial value; ztier keeps this rank's
    partition on the configured tier) and every module (its direct
    parameters, its parent), then empties each `param.data`: between uses a
    parameter exists only as ztier's partitions;
  - on each module that owns parameters, installs hooks: before its forward
    and before its backward, ztier fetches the module and `param.data` is
    pointed at the full parameter in ztier's memory (a CPU tensor over host
    memory on the host emulation, a CUDA tensor through
    __cuda_array_interface__ on a GPU); after its forward and after its
    backward, the module is released and `param.data` emptied again;
  - replaces nn.Linear's forward by one that saves the weight itself for
    backward (not a transposed view of it), so that the backward uses the
    weight fetched for the backward; a tensor that still views a released
    parameter's memory is reported as an error, never read;
  - the optimizer hands each parameter's full gradient to ztier
    (reduce-scattered, averaged over ranks), then runs ztier's pipelined
    optimizer step (off.adamw / off.adam: state on the config's optimizer
    tier, NVMe by default), or updates this rank's partitions one parameter
    at a time with a stock torch optimizer whose state stays in host memory
    (off.optimizer(torch.optim.X, ...)).

Limits: float32 parameters; module inputs/outputs that pass through the
hooks must not be modified in place (clone them first); a parameter used
outside the modules that own it must be owned (also) by a module that
encloses the use (tie it: `head.weight = embedding.weight`).
"""

from __future__ import annotations

import ctypes
import types
import weakref
from typing import Dict, List, Optional

import torch
from torch import nn

import ztier
from ztier._capi import DType, DeviceKind, Engine, OptimizerKind, StateArray

__all__ = ["offload", "Offload", "Optimizer", "AdamW", "Adam", "linear"]

_DTYPES = {torch.float32: DType.FLOAT32}


class _Linear(torch.autograd.Function):
    """F.linear that saves the weight leaf itself. Its backward re-runs the
    forward under autograd, so the gradients are computed by exactly the
    kernels a plain F.linear backward uses (bit-identical results)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((x, weight, bias), need)]
            out = torch.nn.functional.linear(*xs)
            wanted = [t for t, n in zip(xs, need) if t is not None and n]
            got = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
        return tuple(next(got) if t is not None and n else None for t, n in zip(xs, need))


def linear(x, weight, bias=None):
    """F.linear for parameters offloaded by ztier (see _Linear)."""
    return _Linear.apply(x, weight, bias)


def _linear_forward(self, x):
    return _Linear.apply(x, self.weight, self.bias)


class _PreBackward(torch.autograd.Function):
    """Identity on a module's outputs; its backward (the gradient reaching the
    outputs, before the module's own backward) fetches the module."""

    @staticmethod
    def forward(ctx, off, mid, *xs):
        ctx.off, ctx.mid = off, mid
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.off._fetch(ctx.mid, forward=False)
        return (None, None) + grads


class _PostBackward(torch.autograd.Function):
    """Identity on a module's inputs; its backward (all gradients of the
    inputs computed: the module's backward is done) releases the module."""

    @staticmethod
    def forward(ctx, off, mid, *xs):
        ctx.off, ctx.mid = off, mid
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.off._release(ctx.mid, backward=True)
        return (None, None) + grads


def _apply_to_tensors(fn, off, mid, value):
    """Passes the tensors in `value` (a tensor, or a tuple/list holding some)
    that require grad through fn; returns `value` with them replaced."""
    if isinstance(value, torch.Tensor):
        return fn.apply(off, mid, value)[0] if value.requires_grad else value
    if isinstance(value, (tuple, list)):
        idx = [i for i, v in enumerate(value) if isinstance(v, torch.Tensor) and v.requires_grad]
        if not idx:
            return value
        out = list(value)
        for i, t in zip(idx, fn.apply(off, mid, *[value[i] for i in idx])):
            out[i] = t
        return type(value)(out) if isinstance(value, tuple) else out
    return value


class _CudaView:
    """__cuda_array_interface__ over ztier's device memory (one parameter)."""

    def __init__(self, ptr: int, numel: int):
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": "<f4",
                                         "data": (ptr, False), "version": 2, "strides": None}


class _ParamSlot:
    __slots__ = ("pid", "param", "numel", "shape", "owner", "live_ref", "users")

    def __init__(self, pid, param):
        self.pid = pid
        self.param = param
        self.numel = param.numel()
        self.shape = tuple(param.shape)
        self.owner = None     # keeps ztier memory's Python owner while materialised
        self.live_ref = None  # weak reference to it, to find views that outlive release
        self.users = 0        # active fetches of modules that own it


class Offload:
    """The parameters of `model` on ztier; see the module docstring."""

    def __init__(self, model: nn.Module, config: str, *, rank: int = 0, world_size: int = 1,
                 local_group: Optional[ztier.LocalGroup] = None, device: str = "auto"):
        text = config if "\n" in config or config.lstrip().startswith("{") else None
        self.engine = Engine(config_path=None if text else config, config_text=text, rank=rank,
                             world_size=world_size, local_group=local_group, device=device)
        self.model = model
        self.rank, self.world_size = rank, world_size
        kind, ordinal = self.engine.device()
        self._cuda = kind == DeviceKind.CUDA
        self._cuda_device = ordinal
        self._slots: List[_ParamSlot] = []
        by_param: Dict[int, _ParamSlot] = {}
        for _, p in model.named_parameters():
            if p.dtype not in _DTYPES:
                raise TypeError(f"ztier.torch: parameter dtype {p.dtype} is not supported "
                                "(float32 only)")
            slot = _ParamSlot(len(self._slots), p)
            data = p.detach().to("cpu").contiguous()
            self.engine.register_param(slot.pid, slot.numel, _DTYPES[p.dtype], data)
            by_param[id(p)] = slot
            self._slots.append(slot)
        # Modules in pre-order, so that parents come before children.
        self._modules: List[nn.Module] = []
        self._module_slots: List[List[_ParamSlot]] = []
        ids: Dict[int, int] = {}
        for name, m in model.named_modules():
            mid = len(self._modules)
            parent = -1
            if name:
                parent_name = name.rpartition(".")[0]
                parent = ids[id(model.get_submodule(parent_name))]
            slots = []
            for p in m._parameters.values():
                if p is not None and by_param[id(p)] not in slots:
                    slots.append(by_param[id(p)])
            self.engine.register_module(mid, name or type(m).__name__,
                                        [s.pid for s in slots], parent)
            ids[id(m)] = mid
            self._modules.append(m)
            self._module_slots.append(slots)
        # Empty every parameter: from now on it lives on ztier's tiers.
        for slot in self._slots:
            slot.param.data = self._placeholder()
        self._fetched: List[tuple] = []  # (module id, forward) not yet released
        self._handles = []
        for mid, m in enumerate(self._modules):
            if not self._module_slots[mid]:
                continue  # owns no parameter: nothing to fetch
            if type(m) is nn.Linear:
                m.forward = types.MethodType(_linear_forward, m)
            self._handles.append(m.register_forward_pre_hook(self._make_pre_forward(mid)))
            self._handles.append(m.register_forward_hook(self._make_post_forward(mid)))

    # ---- hooks ----
    def _make_pre_forward(self, mid):
        def hook(module, inputs):
            self._fetch(mid, forward=True)
            if torch.is_grad_enabled():
                return _apply_to_tensors(_PostBackward, self, mid, inputs)
            return None
        return hook

    def _make_post_forward(self, mid):
        def hook(module, inputs, output):
            self._release(mid, backward=False)
            if torch.is_grad_enabled():
                return _apply_to_tensors(_PreBackward, self, mid, output)
            return None
        return hook

    def _placeholder(self):
        return torch.empty(0, dtype=torch.float32,
                           device=f"cuda:{self._cuda_device}" if self._cuda else "cpu")

    def _view(self, slot: _ParamSlot) -> torch.Tensor:
        """A tensor over parameter `slot`'s full data in ztier's memory."""
        ptr = self.engine.param_data(slot.pid)
        if self._cuda:
            owner = _CudaView(ptr, slot.numel)
            flat = torch.as_tensor(owner, device=f"cuda:{self._cuda_device}")
        else:
            owner = (ctypes.c_float * slot.numel).from_address(ptr)
            flat = torch.frombuffer(owner, dtype=torch.float32, count=slot.numel)
        slot.owner = owner
        slot.live_ref = weakref.ref(owner)
        return flat.view(slot.shape)

    def _fetch(self, mid: int, forward: bool) -> None:
        self.engine.fetch(mid, forward)
        # Materialise every view first, so a failure leaves no slot counted.
        views = [self._view(slot) if slot.users == 0 else None
                 for slot in self._module_slots[mid]]
        self._fetched.append((mid, forward))
        for slot, view in zip(self._module_slots[mid], views):
            if view is not None:
                slot.param.data = view
            slot.users += 1

    def _release(self, mid: int, backward: bool) -> None:
        for k in range(len(self._fetched) - 1, -1, -1):
            if self._fetched[k][0] == mid:
                del self._fetched[k]
                break
        if self._cuda:
            # ztier frees the memory in its own stream order: the kernels that
            # read it on torch's stream must be done first.
            torch.cuda.current_stream(self._cuda_device).synchronize()
        self.engine.release(mid, backward)
        # Every slot is released before any error is raised, so none is left
        # counted or pointing at freed memory.
        still_viewed = []
        for slot in self._module_slots[mid]:
            slot.users -= 1
            if slot.users > 0:
                continue
            slot.param.data = self._placeholder()
            slot.owner = None
            if slot.live_ref is not None and slot.live_ref() is not None:
                still_viewed.append(self._param_name(slot))
            slot.live_ref = None
        if still_viewed:
            raise RuntimeError(
                f"ztier.torch: after the release of module {self._modules[mid]._get_name()}"
                f" a tensor still views the memory of {', '.join(still_viewed)} (an op saved"
                " a view of it for backward, e.g. weight.t()); use ztier.torch.linear or"
                " nn.Linear, or tie the weight to a module that encloses the use")

    def _param_name(self, slot: _ParamSlot) -> str:
        for name, p in self.model.named_parameters():
            if p is slot.param:
                return name
        return str(slot.pid)

    # ---- after backward ----
    def finish_backward(self) -> None:
        """Releases modules whose backward release did not run (their inputs
        needed no gradient), then hands every parameter's gradient to ztier
        (registration order on every rank: a collective each) and drops it."""
        for mid, forward in reversed(list(self._fetched)):
            self._release(mid, backward=not forward)
        for slot in self._slots:
            g = slot.param.grad
            if g is None:
                g = torch.zeros(slot.numel, dtype=torch.float32,
                                device=self._placeholder().device)
            g = g.detach().contiguous()
            if self._cuda:
                torch.cuda.current_stream(g.device).synchronize()
            self.engine.grad_reduce(slot.pid, g)
            slot.param.grad = None

    def optimizer(self, optimizer_class, **kwargs) -> "Optimizer":
        """A stock torch optimizer over the partitions (its state in host memory)."""
        return Optimizer(self, optimizer_class, **kwargs)

    def adamw(self, **kwargs) -> "AdamW":
        """ztier's own AdamW, its state on the config's optimizer tier (NVMe)."""
        return AdamW(self, **kwargs)

    def adam(self, **kwargs) -> "Adam":
        """ztier's own Adam (L2 weight decay), its state on the optimizer tier."""
        return Adam(self, **kwargs)

    def full_parameters(self) -> Dict[str, torch.Tensor]:
        """Every parameter's current full value (gathered through a partition
        read per rank; world size 1 only), for checks and checkpoints."""
        if self.world_size != 1:
            raise NotImplementedError("full_parameters() needs world size 1")
        out = {}
        for name, p in self.model.named_parameters():
            slot = next(s for s in self._slots if s.param is p)
            buf = torch.empty(slot.numel, dtype=torch.float32)
            self.engine.partition_read(slot.pid, buf)
            out[name] = buf.view(slot.shape)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.engine.close()


class _StepBase:
    """What both optimizers share: zero_grad, and step() = gradients to
    ztier, the update (_update), gradients cleared, step end."""

    off: Offload

    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self.off._slots:
            slot.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.off.finish_backward()
        self._update()
        self.off.engine.grad_clear()
        self.off.engine.step_end()

    def _update(self) -> None:
        raise NotImplementedError


class Optimizer(_StepBase):
    """A stock torch optimizer over this rank's partitions (flat, with
    padding). step(): gradients to ztier, then for each parameter read its
    partition and gradient partition, update, write back; then step end."""

    def __init__(self, off: Offload, optimizer_class, **kwargs):
        self.off = off
        self._parts = [nn.Parameter(torch.empty(0)) for _ in off._slots]
        self.inner = optimizer_class(self._parts, **kwargs)

    def _update(self) -> None:
        off = self.off
        for slot, part in zip(off._slots, self._parts):
            n = off.engine.param_info(slot.pid).partition_numel
            data = torch.empty(n, dtype=torch.float32)
            grad = torch.empty(n, dtype=torch.float32)
            off.engine.partition_read(slot.pid, data)
            off.engine.grad_partition_read(slot.pid, grad)
            part.data = data
            part.grad = grad
            self.inner.step()  # only this partition has a gradient
            off.engine.partition_write(slot.pid, part.data)
            part.data = torch.empty(0)
            part.grad = None


class AdamW(_StepBase):
    """AdamW run by ztier, its state (fp32 master weights and both moments)
    on the config's `optimizer` tier (NVMe by default), streamed through in
    sub-groups by one pipelined step: the same arithmetic as
    torch.optim.AdamW (bit for bit on the CPU). step(): gradients to ztier,
    the optimizer step, gradients cleared, step end. Change the learning rate
    through param_groups[0]["lr"], as with a torch optimizer."""

    _kind = OptimizerKind.ADAMW

    def __init__(self, off: Offload, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, bias_correction: bool = True):
        self.off = off
        self.param_groups = [dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                  bias_correction=bias_correction)]
        off.engine.optimizer_create(self._kind, **self.param_groups[0])

    def _update(self) -> None:
        self.off.engine.optimizer_step(self._kind, **self.param_groups[0])

    def state(self, param: nn.Parameter) -> Dict[str, torch.Tensor]:
        """This rank's partition of `param`'s optimizer state (flat, padded):
        master, exp_avg, exp_avg_sq, as of the last step."""
        slot = next(s for s in self.off._slots if s.param is param)
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

    def __init__(self, off: Offload, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bias_correction: bool = True):
        super().__init__(off, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction)


def offload(model: nn.Module, config: str, **kwargs) -> Offload:
    """Puts `model`'s parameters on ztier (`config`: a YAML path or YAML
    text); keyword arguments as Offload."""
    return Offload(model, config, **kwargs)
