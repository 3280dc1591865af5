"""Offload: an nn.Module's parameters on ztier's tiers, fetched around use.

How a training step runs (see the package docstring for the user's view):

forward   Every module gets a forward pre-hook and hook. A module that owns
          parameters is fetched before its forward (ztier gathers them;
          `param.data` views ztier's memory) and released after it. The
          outermost module call pushes saved-tensor hooks: a tensor autograd
          saves for backward that views a parameter's memory (the weight
          itself, `weight.t()` inside F.linear, a chunk of an in-projection)
          is saved as a reference to that parameter, not as the memory, and
          is rebuilt over the parameter fetched for backward. Other saved
          tensors are kept as they are, with the in-place check torch makes.
touch     A parameter used while released (a parent's forward reading a
          child's weight, as nn.MultiheadAttention does with out_proj) is
          noticed by its class's __torch_function__: its module is fetched
          there and then and released with the module whose forward used it,
          which remembers the use, so its backward fetches it too.
backward  A hook on each output of a module that needs fetching fires when
          the output's gradient is computed, before the module's backward:
          the module is fetched for backward. It is released once every
          parameter it holds that needs a gradient has had its gradient
          accumulated (a hook on the parameter's AccumulateGrad), else at the
          end of the backward pass (a callback queued on the autograd engine).
recompute A module run inside backward (activation checkpointing re-runs
          forwards there) is fetched for backward and kept until its
          backward is done, because the recomputation saves plain aliases of
          its parameters.

Nothing here replaces a module's outputs or inputs (an output aliasing a
parameter about to be released is the one exception: it is cloned), so
outputs may be modified in place and may be of any structure.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import weakref
from typing import Dict, List, Optional

import torch
from torch import nn

import ztier
from ztier._capi import DType, DeviceKind, Engine
from ztier.torch import _construct, _tree
from ztier.torch._params import offloaded_class, original_class

_DTYPES = {torch.float32: DType.FLOAT32, torch.float16: DType.FLOAT16,
           torch.bfloat16: DType.BFLOAT16}
_PREPEND = "prepend" in inspect.signature(nn.Module.register_forward_pre_hook).parameters
_POST_ACCUMULATE = hasattr(torch.Tensor, "register_post_accumulate_grad_hook")


def _no_torch_function():
    return torch._C.DisableTorchFunction()


def _storage_ptr(t: torch.Tensor) -> int:
    """The address of the memory block `t` views (0 when it has none)."""
    try:
        if hasattr(t, "untyped_storage"):
            return t.untyped_storage().data_ptr()
        return t.storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


def _in_autograd_backward() -> bool:
    """True inside a backward pass run by the autograd engine."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(lambda: None)
    except RuntimeError:
        return False
    return True


class _CudaView:
    """__cuda_array_interface__ over ztier's device memory (one parameter)."""

    _TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<V2"}

    def __init__(self, ptr: int, numel: int, dtype: torch.dtype):
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": self._TYPESTR[dtype],
                                         "data": (ptr, False), "version": 2, "strides": None}


class _Slot:
    """One parameter: its id with ztier and its materialised state."""

    __slots__ = ("pid", "param", "name", "numel", "shape", "dtype", "owners", "users", "flat",
                 "memory", "live_ref", "ptr", "acc", "offload", "__weakref__")

    def __init__(self, pid: int, param: nn.Parameter, name: str, offload: "Offload"):
        self.pid = pid
        self.param = param
        self.name = name
        self.numel = param.numel()
        self.shape = tuple(param.shape)
        self.dtype = param.dtype
        self.owners: List[int] = []  # modules whose own parameters include it
        self.users = 0               # holds (fetches not yet released) of those modules
        self.flat = None             # 1-D tensor over ztier's memory, while users > 0
        self.memory = None           # that memory's Python owner
        self.live_ref = None         # weak reference to it: views that outlive a release
        self.ptr = 0
        self.acc = None              # its AccumulateGrad node (kept: its hook lives on it)
        self.offload = offload


class _Mod:
    """One module: its own parameters and what its forward touched."""

    __slots__ = ("mid", "module", "name", "slots", "extras", "declared", "bw_held", "pending")

    def __init__(self, mid: int, module: nn.Module, name: str, slots: List[_Slot]):
        self.mid = mid
        self.module = module
        self.name = name
        self.slots = slots
        self.extras: List[int] = []  # modules fetched because its forward used their params
        self.declared: List[int] = []  # of those, declared: fetched before its forward
        self.bw_held = False         # fetched for the backward pass now
        self.pending = set()         # pids whose gradient its backward release waits for

    def needs_backward(self) -> bool:
        return bool(self.slots or self.extras)


class _Frame:
    """One module call in progress (forward)."""

    __slots__ = ("mod", "backward", "touched", "pushed")

    def __init__(self, mod: _Mod, backward: bool):
        self.mod = mod
        self.backward = backward  # a call inside backward (recomputation)
        self.touched: List[int] = []
        self.pushed = None        # the saved-tensor hooks this call pushed

    @property
    def fetched(self) -> bool:
        """This call fetched its module (a forward, of a module with parameters)."""
        return not self.backward and bool(self.mod.slots)


class _ParamRef:
    """A saved tensor that views parameter memory: rebuilt at unpack."""

    __slots__ = ("slot", "offset", "size", "stride", "dtype")

    def __init__(self, slot: _Slot, t: torch.Tensor):
        self.slot = slot
        self.offset = t.storage_offset()
        self.size = tuple(t.size())
        self.stride = tuple(t.stride())
        self.dtype = t.dtype


class Offload:
    """The parameters of `model` on ztier; see the package docstring.

    Ranks: `rank`, `world_size` and `local_group` (threads) as given; else,
    with torch.distributed initialised at world size > 1, the process
    group's ranks as processes (docs/torch.md, Many processes): the ranks
    meet through `store` (default: torchrun's, at $MASTER_ADDR:$MASTER_PORT)
    and, with `broadcast`, start from rank 0's parameters."""

    def __init__(self, model: nn.Module, config: str, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None,
                 local_group: Optional[ztier.LocalGroup] = None, device: str = "auto",
                 dtype: Optional[torch.dtype] = None, init=None, weights=None, store=None,
                 broadcast: bool = True):
        text = config if "\n" in config or config.lstrip().startswith("{") else None
        comm = _comm_options(rank, world_size, local_group, device, store)
        rank, world_size = comm["rank"], comm["world_size"]
        # Ranks that are processes of a torch.distributed group start from
        # rank 0's parameters (as DDP): each is broadcast before registering.
        self._broadcast = _broadcast_device() if comm.pop("process_group") and \
            broadcast else None
        self.engine = Engine(config_path=None if text else config, config_text=text,
                             device=device, **comm)
        self.model = model
        self.rank, self.world_size = rank, world_size
        kind, ordinal = self.engine.device()
        self._cuda = kind == DeviceKind.CUDA
        self._device = torch.device(f"cuda:{ordinal}" if self._cuda else "cpu")
        self._slots: List[_Slot] = []
        self._mods: List[_Mod] = []
        self._stack: List[_Frame] = []
        self._bw_order: List[_Mod] = []   # held for backward, in fetch order
        self._bw_loose: List[int] = []    # modules fetched in backward by a saved reference
        self._bw_queued = False           # the end-of-backward callback is queued
        self._alias: Dict[int, _Slot] = {}  # memory address -> materialised slot
        self._optimizer = None  # ztier's optimizer over these parameters, told of backward
        self._handles = []
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"ztier.torch: dtype {dtype} is not float32, float16 or bfloat16")
        self._dtype = dtype
        self._init = init
        self._weights = _construct.open_weights(weights)
        try:
            self._register(model)
        finally:
            if self._weights is not None and not isinstance(weights, _construct.StateDictFile):
                self._weights.close()
            self._weights = None
        self._install_hooks()

    # ------------------------------------------------------------ set-up
    def _register(self, model: nn.Module) -> None:
        """Registers every parameter with ztier, module by module (pre-order,
        which is named_parameters() order): a module's parameters built on
        the meta device are materialised and initialised first, and each is
        emptied once ztier has it, so at most one module's parameters are
        whole in host memory at a time."""
        by_param: Dict[int, _Slot] = {}
        names = {}
        for name, p in model.named_parameters():
            names.setdefault(id(p), name)
        for mname, m in model.named_modules():
            own = [k for k, p in m._parameters.items() if p is not None and id(p) not in by_param]
            if not own and not _construct.has_meta_buffers(m):
                continue
            _construct.materialize(model, mname, m, own, names, self._init, self._weights)
            for key in own:
                p = m._parameters[key]
                name = names.get(id(p)) or names[id(_construct.replaced_from(p))]
                self._register_param(p, name, by_param)
        ids: Dict[int, int] = {}
        for name, m in model.named_modules():
            mid = len(self._mods)
            parent = ids[id(model.get_submodule(name.rpartition(".")[0]))] if name else -1
            slots: List[_Slot] = []
            for p in m._parameters.values():
                if p is not None and by_param[id(p)] not in slots:
                    slots.append(by_param[id(p)])
            self.engine.register_module(mid, name or type(m).__name__, [s.pid for s in slots],
                                        parent)
            for s in slots:
                s.owners.append(mid)
            ids[id(m)] = mid
            self._mods.append(_Mod(mid, m, name or type(m).__name__, slots))
        self._mod_of: Dict[int, _Mod] = {id(mod.module): mod for mod in self._mods}
        # From now on each parameter lives on ztier's tiers.
        with _no_torch_function():
            for slot in self._slots:
                slot.param.__class__ = offloaded_class(type(slot.param))
                slot.param._ztier_slot = slot

    def _register_param(self, p: nn.Parameter, name: str, by_param: Dict[int, _Slot]) -> None:
        if self._dtype is not None and p.dtype != self._dtype:
            with torch.no_grad():
                p.data = p.data.to(self._dtype)
        if p.dtype not in _DTYPES:
            raise TypeError(f"ztier.torch: parameter {name} is {p.dtype}; offloaded "
                            "parameters are float32, float16 or bfloat16 (or pass dtype=)")
        slot = _Slot(len(self._slots), p, name, self)
        data = p.detach().to("cpu").contiguous()
        if self._broadcast is not None:  # rank 0's value, on every rank
            if data.data_ptr() == p.data_ptr():
                data = data.clone()  # the model's own memory stays the caller's
            buf = data if self._broadcast.type == "cpu" else data.to(self._broadcast)
            torch.distributed.broadcast(buf, src=0)
            if buf is not data:
                data.copy_(buf)
        self.engine.register_param(slot.pid, slot.numel, _DTYPES[p.dtype], data)
        del data
        # Its qualified name and shape, for checkpoints and their export.
        self.engine.param_set_name(slot.pid, name, slot.shape)
        # Emptied now, not after the whole model: one module's worth is whole at a time.
        with _no_torch_function():
            p.data = self._placeholder(p.dtype)
        by_param[id(p)] = slot
        self._slots.append(slot)

    def _install_hooks(self) -> None:
        for mod in self._mods:
            pre = self._make_pre_forward(mod)
            if _PREPEND:
                h = mod.module.register_forward_pre_hook(pre, prepend=True)
            else:
                h = mod.module.register_forward_pre_hook(pre)
                mod.module._forward_pre_hooks.move_to_end(h.id, last=False)
            self._handles.append(h)
            self._handles.append(mod.module.register_forward_hook(self._make_post_forward(mod)))

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(0, dtype=dtype, device=self._device)

    # ------------------------------------------------------------ memory
    def _materialize(self, slot: _Slot) -> None:
        ptr = self.engine.param_data(slot.pid)
        if self._cuda:
            memory = _CudaView(ptr, slot.numel, slot.dtype)
            flat = torch.as_tensor(memory, device=self._device)
            if slot.dtype == torch.bfloat16:
                flat = flat.view(torch.bfloat16)
        else:
            nbytes = slot.numel * torch.empty(0, dtype=slot.dtype).element_size()
            memory = (ctypes.c_uint8 * nbytes).from_address(ptr)
            flat = torch.frombuffer(memory, dtype=slot.dtype, count=slot.numel)
        slot.flat, slot.memory, slot.ptr = flat, memory, ptr
        slot.live_ref = weakref.ref(memory)
        with _no_torch_function():
            slot.param.data = flat.view(slot.shape)
        self._alias[ptr] = slot
        if slot.acc is None and slot.param.requires_grad:
            self._hook_accumulation(slot)

    def _hook_accumulation(self, slot: _Slot) -> None:
        """Calls _accumulated(slot) each time slot's gradient is accumulated.
        The node is taken while the parameter has its full shape (autograd
        checks gradients against the shape it was made with) and kept."""
        ref = weakref.ref(slot)

        def on_accumulated(*_):
            s = ref()
            if s is not None and s.offload is not None:
                s.offload._accumulated(s)

        with _no_torch_function(), torch.enable_grad():
            if _POST_ACCUMULATE:
                slot.acc = slot.param.register_post_accumulate_grad_hook(on_accumulated)
            else:
                acc = slot.param.expand_as(slot.param).grad_fn.next_functions[0][0]
                acc.register_hook(on_accumulated)
                slot.acc = acc

    def _dematerialize(self, slot: _Slot) -> bool:
        """Empties slot's parameter; True if a tensor still views its memory."""
        with _no_torch_function():
            slot.param.data = self._placeholder(slot.dtype)
        self._alias.pop(slot.ptr, None)
        slot.flat = slot.memory = None
        slot.ptr = 0
        viewed = slot.live_ref is not None and slot.live_ref() is not None
        slot.live_ref = None
        return viewed

    def _acquire(self, mod: _Mod, forward: bool) -> None:
        """Fetches `mod` (its own parameters) and materialises them."""
        if not mod.slots:
            return
        self.engine.fetch(mod.mid, forward)
        for slot in mod.slots:
            if slot.users == 0:
                try:
                    self._materialize(slot)
                except BaseException:
                    self._undo_partial(mod, slot, forward)
                    raise
            slot.users += 1

    def _undo_partial(self, mod: _Mod, failed: _Slot, forward: bool) -> None:
        for slot in mod.slots:
            if slot is failed:
                break
            slot.users -= 1
            if slot.users == 0:
                self._dematerialize(slot)
        self.engine.release(mod.mid, not forward)

    def _drop(self, mod: _Mod, backward: bool) -> None:
        """Releases `mod` and empties the parameters no other hold keeps."""
        if not mod.slots:
            return
        if self._cuda:
            # ztier frees the memory in its own stream order: the kernels that
            # read it on torch's stream must be done first.
            torch.cuda.current_stream(self._device).synchronize()
        self.engine.release(mod.mid, backward)
        still_viewed = []
        for slot in mod.slots:
            slot.users -= 1
            if slot.users == 0 and self._dematerialize(slot):
                still_viewed.append(slot.name)
        if still_viewed:
            raise RuntimeError(
                f"ztier.torch: after the release of module '{mod.name}' a tensor still views "
                f"the memory of {', '.join(still_viewed)}: something keeps a view of the "
                "parameter beyond the module's call (an attribute caching weight.t(), or a "
                "custom autograd Function saving it through ctx instead of "
                "save_for_backward). Keep the view inside the forward, or save the "
                "parameter itself")

    # ------------------------------------------------------------ forward
    def _make_pre_forward(self, mod: _Mod):
        def hook(module, inputs):
            self._pre_forward(mod)
        return hook

    def _make_post_forward(self, mod: _Mod):
        def hook(module, inputs, output):
            return self._post_forward(mod, output)
        return hook

    def _pre_forward(self, mod: _Mod) -> None:
        if self._stack and mod.mid == 0:
            self._abandon_forward()  # the last forward raised before its end
        backward = self._stack[-1].backward if self._stack else self._outermost_in_backward()
        frame = _Frame(mod, backward)
        acquired = False
        if not self._stack and not backward and torch.is_grad_enabled():
            frame.pushed = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            frame.pushed.__enter__()
        try:
            if backward:
                self._hold_for_backward(mod)
            else:
                self._acquire(mod, forward=True)
                acquired = True
                for mid in mod.declared:
                    if any(s.users == 0 for s in self._mods[mid].slots):
                        self._acquire(self._mods[mid], forward=True)
                        frame.touched.append(mid)
        except BaseException:
            for mid in reversed(frame.touched):
                self._drop(self._mods[mid], backward=False)
            if acquired:
                self._drop(mod, backward=False)
            if frame.pushed is not None:
                frame.pushed.__exit__(None, None, None)
            raise
        self._stack.append(frame)

    def _outermost_in_backward(self) -> bool:
        """For an outermost module call: whether it runs inside backward
        (a recomputation). A call outside backward starts a new pass: holds
        a failed backward left behind are released."""
        if torch.is_grad_enabled() and _in_autograd_backward():
            return True
        if self._bw_order or self._bw_loose:
            self._end_backward()
        self._bw_queued = False
        return False

    def _post_forward(self, mod: _Mod, output):
        if not self._stack or self._stack[-1].mod is not mod:
            return None  # a call the pre-hook did not see (hooks added mid-call)
        frame = self._stack.pop()
        try:
            if frame.backward:
                return None  # kept until its backward is done
            result = None
            grad = torch.is_grad_enabled()
            if grad and (frame.fetched or frame.touched):
                result = self._unalias_outputs(frame, output)
            if grad and mod.needs_backward():
                self._hook_outputs(mod, output if result is None else result)
            for mid in reversed(frame.touched):
                self._drop(self._mods[mid], backward=False)
            if frame.fetched:
                self._drop(mod, backward=False)
            return result
        finally:
            if frame.pushed is not None:
                frame.pushed.__exit__(None, None, None)

    def _unalias_outputs(self, frame: _Frame, output):
        """An output that views a parameter this call releases is cloned
        (autograd-wise a copy of it), so the output outlives the release."""
        ptrs = {s.ptr for s in frame.mod.slots if s.ptr}
        for mid in frame.touched:
            ptrs.update(s.ptr for s in self._mods[mid].slots if s.ptr)
        if not ptrs:
            return None

        def clone_alias(t):
            return t.clone() if _storage_ptr(t) in ptrs else None

        out = _tree.map_tensors(output, clone_alias)
        return None if out is output else out

    def _abandon_forward(self) -> None:
        """Cleans up after a forward that raised: releases what it fetched."""
        frames, self._stack = self._stack, []
        for frame in reversed(frames):
            if frame.pushed is not None:
                frame.pushed.__exit__(None, None, None)
            if frame.backward:
                continue
            for mid in reversed(frame.touched):
                self._drop(self._mods[mid], backward=False)
            if frame.fetched:
                self._drop(frame.mod, backward=False)

    # ------------------------------------------------------------ touch
    def _touch(self, slots: List[_Slot], func) -> None:
        """Released parameters used by a torch call: fetch their modules."""
        for slot in slots:
            if slot.users > 0:
                continue  # fetched with an earlier one of the list
            owner = self._mods[slot.owners[0]]
            if self._stack:
                frame = self._stack[-1]
                if frame.backward:
                    self._hold_for_backward(owner)
                    self._note_extra(frame.mod, owner)
                    continue
                self._acquire(owner, forward=True)
                frame.touched.append(owner.mid)
                self._note_extra(frame.mod, owner)
            elif _in_autograd_backward():
                self._fetch_loose(owner)
            else:
                fname = getattr(func, "__name__", str(func))
                raise RuntimeError(
                    f"ztier.torch: parameter '{slot.name}' {list(slot.shape)} was used by "
                    f"{fname}() outside the forward of the offloaded model; between uses it "
                    "exists only on ztier's tiers. Use it inside a module's forward, or "
                    "initialise / load / move the model before ztier.torch.offload() (to "
                    "read the weights use off.full_parameters())")

    @staticmethod
    def _note_extra(mod: _Mod, owner: _Mod) -> None:
        if owner is not mod and owner.mid not in mod.extras:
            mod.extras.append(owner.mid)

    def register_external_parameter(self, module: nn.Module, param: nn.Parameter) -> None:
        """Declares that `module`'s forward uses `param`, a parameter of
        another module, in a way ztier cannot see (its `.data`, a pointer a
        custom extension reads): `param`'s module is then fetched before
        `module`'s forward and backward and released with it. Uses through
        torch calls need no declaration."""
        mod = next((m for m in self._mods if m.module is module), None)
        if mod is None:
            raise ValueError("ztier.torch: that module is not part of the offloaded model")
        owner = self._mods[self.slot_of(param).owners[0]]
        self._note_extra(mod, owner)
        if owner is not mod and owner.mid not in mod.declared:
            mod.declared.append(owner.mid)

    # ------------------------------------------------------------ hints
    def hint(self, modules) -> None:
        """Tells ztier which modules of the model run next, when the trainer
        knows before the learned trace can (an MoE router's chosen experts,
        right after the router ran): their parameters are prefetched now.

        `modules`: an nn.Module or an iterable of them, in the order they
        will run. A module stands for every parameter fetch its call makes:
        itself if it owns parameters, then its submodules that own
        parameters in registration (named_modules) order, which is the order
        a container such as nn.Sequential runs them, and the modules whose
        parameters its forward was seen to use (register_external_parameter,
        a parent reading a child's weight). So `self.experts[i]`, an MLP of
        nn.Linear children, hints those Linears. A module of the model that
        has nothing to fetch (nn.GELU, a parameter-free expert) is ignored: a
        hint is a prediction and naming such a module predicts nothing. A
        module that is not part of the offloaded model (another model, a
        copy, a module added after offload()) is a ValueError naming it.

        The engine places the hinted modules into the next choice slots of
        the order it learned (positions where steps ran different modules);
        before it has learned a step, or with nothing left to choose, a hint
        does nothing. It never changes results: a module fetched that was not
        hinted is fetched as usual. At world size > 1 every rank must give
        the same hints at the same place (they start all-gathers)."""
        if isinstance(modules, nn.Module):
            modules = [modules]
        try:
            items = list(modules)
        except TypeError:
            raise TypeError("ztier.torch: hint() takes an nn.Module or an iterable of "
                            f"nn.Modules, not {type(modules).__name__}") from None
        mids: List[int] = []
        for m in items:
            mids.extend(self._hint_ids(m))
        if mids:
            self.engine.hint(mids)

    def _hint_ids(self, module) -> List[int]:
        """The ids of the modules whose fetches a call of `module` makes, in
        the order it makes them (as far as registration order tells)."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"ztier.torch: hint() takes nn.Modules; got {type(module).__name__}")
        top = self._mod_of.get(id(module))
        if top is None or top.module is not module:
            raise ValueError(
                f"ztier.torch: hint() was given {_describe(module)}, which is "
                "not a module of the model this Offload was made over (it was not in "
                "model.named_modules() when offload() ran: another model, a copy, or a "
                "module added later). Pass the model's own modules, e.g. "
                "model.blocks[0].experts[3] or the list of experts a router chose")
        out: List[int] = []
        seen = set()

        def add(mod: _Mod) -> None:
            if mod.slots and mod.mid not in seen:
                seen.add(mod.mid)
                out.append(mod.mid)
            for mid in mod.declared + mod.extras:
                other = self._mods[mid]
                if other.slots and mid not in seen:
                    seen.add(mid)
                    out.append(mid)
        for sub in module.modules():  # pre-order, as registration
            mod = self._mod_of.get(id(sub))
            if mod is not None and mod.module is sub:
                add(mod)
        return out

    # ------------------------------------------------------------ saved tensors
    def _pack(self, t: torch.Tensor):
        slot = self._alias.get(_storage_ptr(t)) if self._alias else None
        if slot is not None and t.device == slot.flat.device:
            return _ParamRef(slot, t)
        d = t.detach()  # shares t's version counter, holds no graph
        return d, d._version

    def _unpack(self, packed):
        if isinstance(packed, _ParamRef):
            slot = packed.slot
            if slot.users == 0:
                self._fetch_loose(self._mods[slot.owners[0]])
            base = slot.flat if packed.dtype == slot.dtype else slot.flat.view(packed.dtype)
            return base.as_strided(packed.size, packed.stride, packed.offset)
        t, version = packed
        if t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by "
                f"an inplace operation: [{t.type()} {list(t.shape)}] is at version "
                f"{t._version}; expected version {version} instead")
        return t

    # ------------------------------------------------------------ backward
    def _hook_outputs(self, mod: _Mod, output) -> None:
        def pre_backward(grad):
            self._note_backward()
            self._hold_for_backward(mod)
        for t in _tree.tensors(output):
            if t.requires_grad:
                t.register_hook(pre_backward)

    def _note_backward(self) -> None:
        if not self._bw_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._bw_queued = True
            if self._optimizer is not None:
                self._optimizer._backward_started()

    def _hold_for_backward(self, mod: _Mod) -> None:
        if mod.bw_held:
            return
        self._note_backward()
        self._acquire(mod, forward=False)
        held = [mod]
        try:
            for mid in mod.extras:
                self._acquire(self._mods[mid], forward=False)
                held.append(self._mods[mid])
        except BaseException:
            for m in reversed(held):
                self._drop(m, backward=True)
            raise
        mod.bw_held = True
        mod.pending = {s.pid for m in held for s in m.slots
                       if s.acc is not None and s.param.requires_grad}
        self._bw_order.append(mod)

    def _fetch_loose(self, owner: _Mod) -> None:
        """A saved parameter reference unpacked while released: fetched for
        the rest of this backward pass."""
        self._note_backward()
        self._acquire(owner, forward=False)
        self._bw_loose.append(owner.mid)

    def _accumulated(self, slot: _Slot) -> None:
        if self._optimizer is not None:
            self._optimizer._gradient_ready(slot)
        for mod in list(self._bw_order):
            if slot.pid in mod.pending:
                mod.pending.discard(slot.pid)
                if not mod.pending:
                    self._release_backward(mod)

    def _release_backward(self, mod: _Mod) -> None:
        self._bw_order.remove(mod)
        mod.bw_held = False
        mod.pending = set()
        for mid in reversed(mod.extras):
            self._drop(self._mods[mid], backward=True)
        self._drop(mod, backward=True)

    def _end_backward(self) -> None:
        """End of a backward pass: releases every hold still open."""
        self._bw_queued = False
        errors = []
        for mod in reversed(list(self._bw_order)):
            try:
                self._release_backward(mod)
            except Exception as e:  # release the rest first
                errors.append(e)
        loose, self._bw_loose = self._bw_loose, []
        for mid in reversed(loose):
            try:
                self._drop(self._mods[mid], backward=True)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------ the step
    def finish_backward(self) -> None:
        """Releases what a backward left held, then hands each trainable
        parameter's gradient to ztier (registration order on every rank: a
        collective each). `param.grad` stays, as torch's optimizers leave it,
        until zero_grad. A parameter whose grad is None on every rank is
        left without one (the optimizer skips it, as torch's do; a zeroed
        grad is a gradient); one that has it on some ranks only contributes
        zeros from the others, so that every rank issues the same
        collectives (the ranks agree first)."""
        self._settle()
        handed = self._optimizer._handed if self._optimizer is not None else {}
        trainable = [s for s in self._slots if s.param.requires_grad]
        members = getattr(self._optimizer, "_members", None)
        if members is not None:
            # ztier's optimizer updates its parameters only; a gradient of any
            # other would have nowhere to go (tiers.gradients: nvme keeps
            # them in the optimizer's store) and is left in .grad.
            trainable = [s for s in trainable if s.pid in members]
        anywhere = self._gradients_anywhere(trainable)
        for slot, any_rank in zip(trainable, anywhere):
            g = slot.param.grad
            if g is None:
                if not any_rank:
                    continue  # no rank has one: skipped everywhere, as torch skips it
                g = torch.zeros(slot.numel, dtype=slot.dtype, device=self._device)
            elif handed.get(slot.pid) == (id(g), g._version):
                continue  # handed in during backward and not changed since
            streaming = self._optimizer is not None and getattr(self._optimizer, "_stream", False)
            if self._optimizer is not None:
                self._optimizer._handing_in(slot.pid)
            self.hand_in(slot, g, accumulate=streaming)
            if streaming and slot.param.grad is g:
                slot.param.grad = None

    def _settle(self) -> None:
        """Releases what a forward that raised or a backward left held, so
        that no parameter is in use (between steps: nothing is)."""
        if self._stack:
            self._abandon_forward()
        if self._bw_order or self._bw_loose:
            self._end_backward()
        self._bw_queued = False

    def _gradients_anywhere(self, slots: List[_Slot]) -> List[bool]:
        """Per slot: whether any rank has its gradient this step (at world
        size > 1 an exchange of bitmasks, 64 parameters a value)."""
        mine = [s.param.grad is not None for s in slots]
        if self.world_size == 1:
            return mine
        out = []
        for base in range(0, len(slots), 64):
            chunk = mine[base:base + 64]
            bits = sum(1 << k for k, have in enumerate(chunk) if have)
            merged = 0
            for v in self.engine.exchange_u64(bits):
                merged |= v
            out.extend(bool(merged >> k & 1) for k in range(len(chunk)))
        return out

    def hand_in(self, slot: _Slot, g: torch.Tensor, accumulate: bool = False) -> None:
        """Gives gradient `g` of `slot`'s parameter to ztier (a collective
        at world size > 1): it replaces the partition ztier holds, or with
        `accumulate` is added to it."""
        g = g.detach().to(slot.dtype).contiguous()
        if self._cuda:
            torch.cuda.current_stream(g.device).synchronize()
        if accumulate:
            self.engine.grad_accumulate(slot.pid, g)
        else:
            self.engine.grad_reduce(slot.pid, g)

    def optimizer(self, optimizer_class, **kwargs):
        """A stock torch optimizer over the partitions (its state in host memory)."""
        from ztier.torch._optim import PartitionOptimizer
        return PartitionOptimizer(self, optimizer_class, **kwargs)

    def adamw(self, params=None, **kwargs):
        """ztier's own AdamW, its state on the config's optimizer tier (NVMe);
        `params` as torch.optim.AdamW's (parameter groups allowed), default
        every parameter that requires a gradient."""
        from ztier.torch._optim import AdamW
        return AdamW(self, params, **kwargs)

    def adam(self, params=None, **kwargs):
        """ztier's own Adam (L2 weight decay), its state on the optimizer tier."""
        from ztier.torch._optim import Adam
        return Adam(self, params, **kwargs)

    # ------------------------------------------------------------ access
    def slot_of(self, param) -> _Slot:
        slot = param.__dict__.get("_ztier_slot") if isinstance(param, torch.Tensor) else None
        if slot is None or slot.offload is not self:
            raise ValueError("ztier.torch: that tensor is not a parameter of this offloaded model")
        return slot

    def full_parameters(self) -> Dict[str, torch.Tensor]:
        """Every parameter's current full value (gathered through a partition
        read per rank; world size 1 only), for checks and checkpoints."""
        if self.world_size != 1:
            raise NotImplementedError("full_parameters() needs world size 1")
        out = {}
        for name, p in self.model.named_parameters():
            slot = self.slot_of(p)
            buf = torch.empty(slot.numel, dtype=slot.dtype)
            self.engine.partition_read(slot.pid, buf)
            out[name] = buf.view(slot.shape)
        return out

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path, optimizer=None, extra=None, *, buffers: bool = True,
                        background: bool = False) -> None:
        """Saves the training state to directory `path` (docs/torch.md,
        Checkpoints). Collective: every rank calls it, with the same path.

        The engine saves every rank's parameter partitions, pending
        gradients and optimizer state (fp32 master, moments, step counts);
        with them goes a pickle of the Python side: `extra` (anything
        picklable: a scheduler's state_dict(), the data position), the
        optimizer's param_groups without their parameters (lr, betas, ...),
        torch's RNG states, the model's persistent buffers (`buffers`) and
        the optimizer's pending factors. Each rank's Python part is kept.
        `optimizer`: ztier's AdamW / Adam (default: the one made over this
        model, if any) or off.optimizer(...) (world size 1). The directory
        appears whole or not at all; a checkpoint already there is replaced
        atomically.

        `background=True` returns once the parameters are written: the
        optimizer state is written while the next forward and backward run,
        and the save is finished and published by the next optimizer step
        (or wait_checkpoint(), which raises if it failed)."""
        from ztier.torch import _checkpoint
        _checkpoint.save(self, path, optimizer, extra, buffers, background)

    def wait_checkpoint(self) -> None:
        """Finishes a background save_checkpoint (collective) and raises if it
        failed; nothing to do without one."""
        self.engine.checkpoint_wait()

    def load_checkpoint(self, path, optimizer=None):
        """Loads checkpoint `path` (saved at any world size) into this
        model and `optimizer` (default: ztier's optimizer made over this
        model, if any; it must have the saved run's parameter groups), and
        torch's RNG states and the saved buffers; returns the `extra` given
        to save_checkpoint. Each rank calls it (no collective). Gradients of
        the run before the load are dropped (param.grad, ztier's pending
        ones: the checkpoint's pending gradients replace them), and the next
        forward fetches the loaded weights. Unpickles the checkpoint's user
        data: load only checkpoints you trust."""
        from ztier.torch import _checkpoint
        return _checkpoint.load(self, path, optimizer)

    def close(self) -> None:
        """Removes the hooks and destroys the engine (the parameters stay
        empty: read them with full_parameters() first)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        with _no_torch_function():
            for slot in self._slots:
                slot.param.__class__ = original_class(type(slot.param))
                slot.param.__dict__.pop("_ztier_slot", None)
                slot.offload = None
        self.engine.close()


def _describe(module: nn.Module) -> str:
    """A module on one line: Linear(in_features=4, ...), or a container's
    children (Sequential(0: Linear, 1: GELU, 2: Linear))."""
    children = list(module.named_children())
    if not children:
        return f"{type(module).__name__}({module.extra_repr()})"
    inner = ", ".join(f"{n}: {type(c).__name__}" for n, c in children[:6])
    return f"{type(module).__name__}({inner}{', ...' if len(children) > 6 else ''})"


_engines_made = 0  # Offloads made over torch.distributed's group in this process


def _comm_options(rank, world_size, local_group, device: str, store) -> dict:
    """The Engine's rank, world size and collective: as given, else from
    torch.distributed's default process group when one is initialised with
    more than one rank (ranks as processes), else world size 1.
    "process_group": whether the group's ranks are this engine's."""
    global _engines_made
    if rank is not None or world_size is not None or local_group is not None:
        out = dict(rank=rank or 0, world_size=world_size or 1, local_group=local_group,
                   process_group=False)
        if store is not None and local_group is None and out["world_size"] > 1:
            # Processes that meet through the caller's store, without a
            # process group (no initial broadcast: the caller's weights).
            out.update(gloo_store=store, gloo_prefix=f"ztier/{_engines_made}")
            _engines_made += 1
        return out
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return dict(rank=0, world_size=1, process_group=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Offloads made over the group, counted alike on every rank: the n-th
    # engine's keys in the store are "ztier/<n>/...".
    prefix = f"ztier/{_engines_made}"
    _engines_made += 1
    out = dict(rank=rank, world_size=world, process_group=True)
    if _uses_cuda(device):
        # NCCL: rank 0 makes the unique id, the process group carries it.
        uid = [_nccl_unique_id() if rank == 0 else None]
        dist.broadcast_object_list(uid, src=0, device=_broadcast_device())
        out.update(nccl_unique_id=uid[0], cuda_device=torch.cuda.current_device())
        return out
    out.update(gloo_store=store if store is not None else _env_store(world),
               gloo_prefix=prefix)
    return out


def _uses_cuda(device: str) -> bool:
    """Whether the ranks run on CUDA (then NCCL): device "cuda", or "auto"
    over an NCCL process group with a GPU present."""
    if device == "cuda":
        return True
    if device != "auto" or not torch.cuda.is_available():
        return False
    return "nccl" in str(torch.distributed.get_backend()).lower()


def _broadcast_device() -> torch.device:
    """Where tensors go for torch.distributed's collectives: the current GPU
    over NCCL, else the CPU (gloo)."""
    if "nccl" in str(torch.distributed.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nccl_unique_id() -> bytes:
    nccl = getattr(torch.cuda, "nccl", None)
    make = getattr(nccl, "unique_id", None)
    if make is None:
        raise RuntimeError("ztier.torch: this torch build cannot make an NCCL unique id "
                           "(torch.cuda.nccl.unique_id); pass rank=, world_size= and run "
                           "ztier.Engine with nccl_unique_id yourself")
    return bytes(make())


def _env_store(world_size: int):
    """A client of the store torchrun (or init_process_group's env://) serves
    at $MASTER_ADDR:$MASTER_PORT."""
    import datetime
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise RuntimeError(
            "ztier.torch: torch.distributed is initialised with world size "
            f"{world_size}, so ztier's ranks are its processes, but ztier finds no store "
            "through which they meet: MASTER_ADDR and MASTER_PORT are not set (torchrun "
            "sets them). Pass the store the process group was made with: "
            "ztier.torch.offload(model, config, store=store), or launch with torchrun "
            "(or set them to the address and port of a TCPStore server), or pass "
            "world_size=1 to keep this process to itself")
    return torch.distributed.TCPStore(addr, int(port), world_size=world_size, is_master=False,
                                      timeout=datetime.timedelta(seconds=_STORE_TIMEOUT_S))


# The client's own timeout (connecting, a get); ztier's waits for the other
# ranks' keys are bounded by comm.timeout (through the store's wait()).
_STORE_TIMEOUT_S = 300


def offload(model: nn.Module, config: str, **kwargs) -> Offload:
    """Puts `model`'s parameters on ztier (`config`: a YAML path or YAML
    text); keyword arguments as Offload."""
    return Offload(model, config, **kwargs)
