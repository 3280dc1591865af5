"""Tensors inside the values a module takes and returns.

Module inputs and outputs may be tensors, tuples (named ones too), lists,
dicts (OrderedDicts and dict subclasses such as model-output classes),
dataclasses, None or anything else. `tensors` finds the tensors; `map_tensors`
rebuilds a value with some of them replaced, leaving the value itself as it
is when nothing changes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import torch

_MAX_DEPTH = 64  # deeper nesting is not searched (no real module output is)


def tensors(value, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in `value`, depth first."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth >= _MAX_DEPTH:
        return
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensors(getattr(value, f.name, None), depth + 1)


def map_tensors(value, fn: Callable[[torch.Tensor], Optional[torch.Tensor]], depth: int = 0):
    """`value` with each tensor t replaced by fn(t) where that is not None;
    the same object where nothing is replaced."""
    if isinstance(value, torch.Tensor):
        out = fn(value)
        return value if out is None else out
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, (tuple, list)):
        items = [map_tensors(v, fn, depth + 1) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return type(value)(items) if type(value) is not list else items
        if hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, dict):
        items = {k: map_tensors(v, fn, depth + 1) for k, v in value.items()}
        if all(items[k] is v for k, v in value.items()):
            return value
        out = value.copy() if hasattr(value, "copy") else dict(value)
        for k, v in items.items():
            out[k] = v
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            old = getattr(value, f.name, None)
            new = map_tensors(old, fn, depth + 1)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value
