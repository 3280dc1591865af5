"""Offload.save_checkpoint / load_checkpoint: the training state of an
offloaded model in one checkpoint directory (docs/torch.md, Checkpoints).

The engine's checkpoint (ztier_checkpoint_save) holds what lives on ztier's
tiers: every rank's parameter partitions, pending gradient partitions and
optimizer state. What lives in Python goes in the checkpoint's user data,
each rank's own, as a pickle of a dict:

    format        "ztier.torch-1"
    extra         the caller's object (a scheduler's state_dict(), ...)
    world_size    the saving run's
    param_groups  the optimizer's groups without "params" (lr, betas, eps,
                  weight_decay, initial_lr, ...), and group_names: each
                  group's parameter names, checked at load
    optimizer     ztier's optimizer's pending factors (_optim.AdamW
                  ._checkpoint_state), or the inner state_dict() of an
                  off.optimizer(...) (world size 1)
    rng           torch's CPU RNG state (bytes) and, when CUDA is
                  initialised, every device's
    buffers       the model's persistent buffers (name -> CPU tensor)

A save is collective: before the engine's save, the gradients still in
.grad are handed in (Offload.finish_backward, collectives at world size
> 1) and the ranks agree that each built its user data, so that a Python
error on one rank (an unpicklable `extra`) is raised on every rank instead
of leaving the others waiting in the save. A load is each rank's own.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, Optional

import torch

from ztier._capi import checkpoint_user_data

FORMAT = "ztier.torch-1"


def _kind(off, optimizer):
    """(optimizer, "ztier" | "partition" | None) after checking it belongs to `off`."""
    from ztier.torch._optim import AdamW, PartitionOptimizer
    if optimizer is None:
        optimizer = off._optimizer
        if optimizer is None:
            return None, None
    if isinstance(optimizer, AdamW):
        kind = "ztier"
    elif isinstance(optimizer, PartitionOptimizer):
        kind = "partition"
    else:
        raise TypeError("ztier.torch: checkpoints take ztier's optimizer (off.adamw / off.adam) "
                        f"or off.optimizer(...), got {type(optimizer).__name__}")
    if optimizer.off is not off:
        raise ValueError("ztier.torch: that optimizer belongs to another offloaded model")
    if kind == "partition" and off.world_size != 1:
        raise NotImplementedError(
            "ztier.torch: checkpoints of off.optimizer(...) (a stock torch optimizer over the "
            "partitions, its state in host memory) need world size 1; use off.adamw / "
            "off.adam, whose state the engine saves")
    return optimizer, kind


def _groups(off, optimizer, kind):
    groups = optimizer.inner.param_groups if kind == "partition" else optimizer.param_groups
    hypers = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    if kind == "ztier":
        names = [[off.slot_of(p).name for p in g["params"]] for g in groups]
    else:
        names = [len(g["params"]) for g in groups]  # partitions, in registration order
    return hypers, names


def _persistent_buffers(model) -> Dict[str, torch.Tensor]:
    """What model.state_dict() holds besides parameters (state_dict()
    itself would touch the released parameters)."""
    out = {}
    for name, b in model.named_buffers():
        mname, _, key = name.rpartition(".")
        module = model.get_submodule(mname) if mname else model
        if key in getattr(module, "_non_persistent_buffers_set", ()):
            continue
        out[name] = b
    return out


def _rng_state() -> dict:
    state = {"cpu": bytes(torch.get_rng_state().tolist())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [bytes(s.tolist()) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    if "cpu" in state:
        torch.set_rng_state(torch.tensor(list(state["cpu"]), dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, s in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(list(s), dtype=torch.uint8), device)


def _build(off, optimizer, kind, extra, buffers: bool) -> bytes:
    state = {"format": FORMAT, "extra": extra, "world_size": off.world_size,
             "param_groups": None, "group_names": None, "optimizer": None,
             "optimizer_kind": kind, "rng": _rng_state(), "buffers": None}
    if kind is not None:
        state["param_groups"], state["group_names"] = _groups(off, optimizer, kind)
        state["optimizer"] = (optimizer._checkpoint_state() if kind == "ztier"
                              else optimizer.inner.state_dict())
    if buffers:
        state["buffers"] = {n: b.detach().to("cpu", copy=True)
                            for n, b in _persistent_buffers(off.model).items()}
    return pickle.dumps(state, protocol=4)


def save(off, path, optimizer, extra, buffers: bool, background: bool = False) -> None:
    path = os.fspath(path)
    optimizer, kind = _kind(off, optimizer)
    if kind == "ztier":
        optimizer._cancel_begun()
    # Gradients still in .grad (keep_grads=True between backward and step)
    # go to ztier first, so that the checkpoint's pending gradients are all
    # of them (a collective at world size > 1, as the save).
    off.finish_backward()
    error = None
    try:
        blob = _build(off, optimizer, kind, extra, buffers)
    except Exception as e:  # raised on every rank below
        error, blob = e, b""
    if off.world_size > 1 and not all(off.engine.exchange_u64(0 if error else 1)):
        if error is None:
            raise RuntimeError(f"ztier.torch: checkpoint save to {path}: another rank could not "
                               "build its checkpoint data (its error says why); nothing saved")
    if error is not None:
        raise error
    if background:
        off.engine.checkpoint_save_async(path, blob)
    else:
        off.engine.checkpoint_save(path, blob)


def _parse(raw: bytes, path: str) -> Optional[dict]:
    if not raw:
        return None  # saved through the engine alone: no Python state
    try:
        state = pickle.loads(raw)
    except Exception as e:
        raise ValueError(f"ztier.torch: checkpoint {path}: its user data is not a ztier.torch "
                         f"checkpoint's ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"ztier.torch: checkpoint {path}: user data format {fmt!r}, this "
                         f"version reads {FORMAT!r}")
    return state


def _check(off, optimizer, kind, state: dict, path: str) -> None:
    """Everything the Python side needs, before anything is changed."""
    saved = state.get("param_groups")
    if optimizer is not None and saved is not None:
        if state.get("optimizer_kind") != kind:
            raise ValueError(f"ztier.torch: checkpoint {path} was saved with "
                             f"{state.get('optimizer_kind')!r} optimizer state, this optimizer "
                             f"is {kind!r}")
        hypers, names = _groups(off, optimizer, kind)
        if len(saved) != len(hypers):
            raise ValueError(
                f"ztier.torch: checkpoint {path} holds {len(saved)} optimizer parameter "
                f"group(s), this optimizer has {len(hypers)}: create it with the saved run's "
                "groups")
        for k, (a, b) in enumerate(zip(state["group_names"], names)):
            if a != b:
                if isinstance(a, list) and isinstance(b, list):
                    diff = next((f"'{x}' saved, '{y}' here" for x, y in zip(a, b) if x != y),
                                f"{len(a)} parameters saved, {len(b)} here")
                else:
                    diff = f"{a} parameters saved, {b} here"
                raise ValueError(f"ztier.torch: checkpoint {path}: optimizer parameter group {k} "
                                 f"differs ({diff}): create it with the saved run's groups")
    if kind == "partition" and state.get("optimizer") is not None and state["world_size"] != 1:
        raise ValueError(f"ztier.torch: checkpoint {path} was saved at world size "
                         f"{state['world_size']}; off.optimizer(...) state loads at 1 only")
    buffers = state.get("buffers")
    if buffers is not None:
        mine = _persistent_buffers(off.model)
        if set(mine) != set(buffers):
            missing = sorted(set(buffers) - set(mine)) + sorted(set(mine) - set(buffers))
            raise ValueError(f"ztier.torch: checkpoint {path}: the model's persistent buffers "
                             f"differ from the saved ones ({', '.join(missing[:4])})")
        for name, b in mine.items():
            if tuple(b.shape) != tuple(buffers[name].shape):
                raise ValueError(f"ztier.torch: checkpoint {path}: buffer '{name}' is "
                                 f"{list(b.shape)} here, {list(buffers[name].shape)} saved")


def load(off, path, optimizer):
    path = os.fspath(path)
    optimizer, kind = _kind(off, optimizer)
    state = _parse(checkpoint_user_data(path), path)
    if state is not None and off.rank > 0 and state.get("world_size") == off.world_size:
        # At the saving world size each rank takes back its own (its RNG
        # state, its extra); at another, rank 0's.
        state = _parse(checkpoint_user_data(path, off.rank), path)
    if state is not None:
        _check(off, optimizer, kind, state, path)
    # No parameter may be in use while the engine writes its partitions.
    off._settle()
    if kind == "ztier":
        optimizer._cancel_begun()
    off.engine.checkpoint_load(path)
    # Gradients of the run before the load are stale: the checkpoint's
    # pending gradients are ztier's now. The parameters were all released
    # (their full values freed), so the next fetch gathers the loaded ones.
    for slot in off._slots:
        slot.param.grad = None
    if kind == "ztier":
        optimizer._restore_checkpoint_state(state.get("optimizer") if state else None)
    if state is None:
        return None
    if optimizer is not None and state.get("param_groups") is not None:
        if kind == "partition":
            if state.get("optimizer") is not None:
                optimizer.inner.load_state_dict(state["optimizer"])
        else:
            for group, saved in zip(optimizer.param_groups, state["param_groups"]):
                group.update(saved)
    if state.get("buffers"):
        mine = _persistent_buffers(off.model)
        with torch.no_grad():
            for name, b in state["buffers"].items():
                mine[name].copy_(b)
    if state.get("rng"):
        _set_rng_state(state["rng"])
    return state.get("extra")
