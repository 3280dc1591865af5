"""Building a model whose parameters never exist whole in host memory.

    with ztier.torch.meta_init():        # parameters made here are on the meta device
        model = GPT(config)              # shapes only; buffers are real
    off = ztier.torch.offload(model, cfg, init=model._init_weights)   # or weights="model.pt"

meta_init() puts every nn.Parameter created inside it on torch's meta device
(shape and dtype, no memory), on torch 1.13 and 2.x alike; buffers (causal
masks, BatchNorm statistics) are computed as usual. A model built with
torch 2's `with torch.device("meta")` works too (its meta buffers are
materialised zero-filled and left to the module's initialisation).

offload() then materialises the model one module at a time, in
named_modules() order: a module's meta parameters become CPU tensors, are
initialised, registered with ztier and emptied before the next module, so
peak host memory is about the largest module. Initialisation, per module:
  - weights=<state-dict file or StateDictFile>: each tensor read from the
    file on its own (ztier.torch.StateDictFile: never the whole file);
  - else the module's own reset_parameters() (what its constructor ran),
    then init(module) if init=<function> is given (what model.apply(init)
    would do to it): the model as built eagerly and then initialised, one
    module at a time.
A module with meta parameters, no reset_parameters and no init is an error
naming it. Initialisation that one module's reset_parameters does to
another module's parameters (nn.MultiheadAttention zeroes out_proj.bias)
is not replayed: out_proj is materialised after it, by its own.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
from torch import nn

from ztier.torch._load import StateDictError, StateDictFile

# The nn.Parameter.__new__ that meta_init() wraps (the class attribute as
# stored, a staticmethod, so that it is restored exactly).
_PARAMETER_NEW = nn.Parameter.__dict__["__new__"]
_REPLACED = "_ztier_replaced"  # attribute on a materialised parameter: the meta one


@contextlib.contextmanager
def meta_init():
    """Parameters created inside are on the meta device (see the module
    docstring). Not reentrant across threads: it patches nn.Parameter."""
    original = nn.Parameter.__dict__["__new__"]
    new_fn = original.__func__ if isinstance(original, staticmethod) else original

    def meta_new(cls, data=None, requires_grad=True):
        if isinstance(data, torch.Tensor) and not data.is_meta:
            data = torch.empty(data.shape, dtype=data.dtype, device="meta")
        return new_fn(cls, data, requires_grad)

    nn.Parameter.__new__ = staticmethod(meta_new)
    try:
        yield
    finally:
        nn.Parameter.__new__ = original


def open_weights(weights) -> Optional[StateDictFile]:
    if weights is None or isinstance(weights, StateDictFile):
        return weights
    if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
        return StateDictFile(weights)
    raise TypeError("ztier.torch: weights= takes a state-dict file path or a "
                    "ztier.torch.StateDictFile")


def has_meta_buffers(module: nn.Module) -> bool:
    return any(b is not None and b.is_meta for b in module._buffers.values())


def replaced_from(p: nn.Parameter) -> Optional[nn.Parameter]:
    """The meta parameter `p` was materialised from (None if it was not)."""
    return p.__dict__.get(_REPLACED)


def materialize(model: nn.Module, mname: str, module: nn.Module, keys: List[str],
                names: Dict[int, str], init, weights: Optional[StateDictFile]) -> None:
    """Makes `module`'s parameters `keys` (its own, not registered yet) and
    its buffers real and initialised (see the module docstring)."""
    meta = [k for k in keys if module._parameters[k].is_meta]
    for k in meta:
        _replace_everywhere(model, module._parameters[k])
    for k, b in module._buffers.items():
        if b is not None and b.is_meta:
            module._buffers[k] = torch.zeros(b.shape, dtype=b.dtype)
    if weights is not None:
        _load_module(weights, mname, module, keys, names)
        return
    if not meta:
        return  # built for real: its values are the initialisation
    reset = getattr(module, "reset_parameters", None)
    with torch.no_grad():
        if callable(reset) or init is not None:
            if callable(reset):
                reset()
            if init is not None:
                init(module)
        else:
            raise RuntimeError(
                f"ztier.torch: module '{mname or type(module).__name__}' "
                f"({type(module).__name__}) was built on the meta device but has no "
                "reset_parameters(): pass init=<function(module)> or weights=<state-dict file> "
                "to offload() to initialise it")


def _replace_everywhere(model: nn.Module, old: nn.Parameter) -> None:
    """A CPU parameter (uninitialised memory) in place of meta parameter
    `old` in every module that holds it (tied weights stay tied)."""
    data = torch.empty(old.shape, dtype=old.dtype)
    cls = type(old)
    try:
        new = cls(data, requires_grad=old.requires_grad)
    except TypeError:
        new = nn.Parameter(data, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    new.__dict__[_REPLACED] = old
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is old:
                m._parameters[k] = new


def _load_module(weights: StateDictFile, mname: str, module: nn.Module, keys: List[str],
                 names: Dict[int, str]) -> None:
    prefix = mname + "." if mname else ""
    with torch.no_grad():
        for k in keys:
            p = module._parameters[k]
            name = names.get(id(p)) or names[id(replaced_from(p))]
            _read_into(weights, name, p, "parameter")
        for k, b in module._buffers.items():
            name = prefix + k
            if b is not None and name in weights:
                _read_into(weights, name, b, "buffer")


def _read_into(weights: StateDictFile, name: str, t: torch.Tensor, what: str) -> None:
    if name not in weights:
        have = weights.names()
        raise StateDictError(
            f"ztier.torch: the weights file has no {what} '{name}' ({len(have)} tensors, e.g. "
            f"{', '.join(have[:4])}): save the model's state_dict(), or select the mapping "
            "that holds it with ztier.torch.StateDictFile(path, key=...)")
    shape = weights.shape(name)
    if tuple(shape) != tuple(t.shape):
        raise StateDictError(f"ztier.torch: {what} '{name}' is {list(t.shape)} in the model "
                             f"but {list(shape)} in the weights file")
    if weights.dtype(name) == t.dtype:
        weights.read(name, out=t)
    else:
        t.copy_(weights.read(name))  # converted to the model's dtype
