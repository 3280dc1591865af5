"""What an offloaded parameter is between uses, and how a use is noticed.

Each offloaded `nn.Parameter` keeps its identity (optimizers, state dicts and
the model's own attributes still hold the same object), but its class gains
a `__torch_function__` that sees every torch call the parameter takes part
in. While the parameter is released (its `.data` an empty placeholder):
  - shape questions (`.shape`, `.size()`, `.numel()`, `.dim()`, `.ndim`,
    `.nelement()`, `len()`) answer with the full parameter's shape;
  - attribute reads and writes (`.grad`, `.requires_grad`, `.data`, ...) and
    hook registration pass through untouched (`.data` of a released
    parameter is its empty placeholder: a forward that computes with it
    must be declared, Offload.register_external_parameter);
  - any other call is a use of its data: the owning Offload fetches the
    parameter's module (`Offload._touch`), or says why it cannot.
While it is materialised every call passes straight through.
"""

from __future__ import annotations

import torch
from torch import nn

_NOT_META = object()

# Calls that only ask for the shape, answered from the full shape.
_SHAPE_GETTERS = {torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__}
_SHAPE_METHODS = {torch.Tensor.size, torch.Tensor.numel, torch.Tensor.dim,
                  torch.Tensor.nelement, torch.Tensor.__len__}
# Calls that touch no data.
_PASSTHROUGH = {torch.Tensor.requires_grad_, torch.Tensor.register_hook,
                torch.Tensor.retain_grad, torch.Tensor.__repr__, torch.Tensor.__format__,
                torch.Tensor.__hash__, torch.Tensor.is_floating_point,
                torch.Tensor.is_complex, torch.Tensor.element_size, torch.Tensor.get_device,
                torch.Tensor.is_contiguous}


def disabled(func, types, args, kwargs):
    """Runs `func` as a plain tensor call (results are plain tensors)."""
    return torch._C._disabled_torch_function_impl(func, types, args, kwargs)


def _released(value, out, depth=0):
    """Appends the released offloaded parameters found in `value`."""
    if isinstance(value, OffloadedParameter):
        slot = value.__dict__.get("_ztier_slot")
        if slot is not None and slot.users == 0 and slot.offload is not None:
            out.append(slot)
    elif depth < 4 and isinstance(value, (tuple, list)):
        for v in value:
            _released(v, out, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for v in value.values():
            _released(v, out, depth + 1)


def _shape_answer(func, args, slot):
    """The answer to a shape question about released parameter `slot`."""
    shape = torch.Size(slot.shape)
    if func == torch.Tensor.shape.__get__:
        return shape
    if func == torch.Tensor.ndim.__get__ or func is torch.Tensor.dim:
        return len(shape)
    if func is torch.Tensor.numel or func is torch.Tensor.nelement:
        return slot.numel
    if func is torch.Tensor.__len__:
        if not shape:
            raise TypeError("len() of a 0-d tensor")
        return shape[0]
    if func is torch.Tensor.size:
        return shape if len(args) < 2 else shape[args[1]]
    return _NOT_META


class OffloadedParameter(nn.Parameter):
    """The class an offloaded nn.Parameter takes (see the module docstring)."""

    def __deepcopy__(self, memo):
        slot = self.__dict__.get("_ztier_slot")
        if slot is not None and slot.offload is not None:
            raise RuntimeError(
                f"ztier.torch: deep-copying an offloaded model would copy an empty "
                f"'{slot.name}' (__deepcopy__): its data lives on ztier's tiers. Copy the model "
                "before offload(), or load a copy from off.full_parameters()")
        return super().__deepcopy__(memo)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__") and func not in _SHAPE_GETTERS:
            return disabled(func, types, args, kwargs)
        if func in _PASSTHROUGH:
            return disabled(func, types, args, kwargs)
        pending = []
        _released(args, pending)
        _released(kwargs, pending)
        if pending:
            if func in _SHAPE_GETTERS or func in _SHAPE_METHODS:
                if args and args[0].__dict__.get("_ztier_slot") is pending[0]:
                    answer = _shape_answer(func, args, pending[0])
                    if answer is not _NOT_META:
                        return answer
            pending[0].offload._touch(pending, func)
        return disabled(func, types, args, kwargs)


_SUBCLASSES = {nn.Parameter: OffloadedParameter}


def offloaded_class(cls):
    """The offloaded class for a parameter of class `cls` (a subclass of
    nn.Parameter keeps its own methods)."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type("Offloaded" + cls.__name__, (OffloadedParameter, cls), {})
    return _SUBCLASSES[cls]


def original_class(cls):
    """The inverse of offloaded_class."""
    for orig, sub in _SUBCLASSES.items():
        if sub is cls:
            return orig
    return cls
