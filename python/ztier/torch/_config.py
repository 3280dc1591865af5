"""A config sized from the model it offloads, and what it costs in memory."""

from __future__ import annotations

from typing import Dict

from torch import nn


def _sizes(model: nn.Module):
    """(largest parameter, the four largest modules' own parameters summed,
    the second-largest module's, element bytes, total) in elements."""
    params = list(model.parameters())
    if not params:
        raise ValueError("ztier.torch: the model has no parameters to offload")
    largest = max(p.numel() for p in params)
    own = sorted((sum(p.numel() for p in m._parameters.values() if p is not None)
                  for m in model.modules()), reverse=True)
    window = sum(own[:4])
    second = own[1] if len(own) > 1 else own[0]
    element_bytes = max(p.element_size() for p in params)
    return largest, window, second, element_bytes, sum(p.numel() for p in params)


def model_config(model: nn.Module, path: str, *, buffer_count: int = 4,
                 sub_group_size: float = 4e6, optimizer_buffers: int = 4,
                 gradients: str = "nvme", coordinator: dict = None,
                 dtype=None, memory_limit: int = None) -> str:
    """YAML text that offloads `model`'s parameters, gradients and optimizer
    state to NVMe under `path`, with memory bounded by the model's largest
    module, not its size:
      - `buffer_count` swap buffers, each as large as the largest parameter
        (a partition never spans more than one), pageable (no memlock);
      - gradients on `gradients` ("nvme" or "host");
      - optimizer sub-groups of `sub_group_size` elements, `optimizer_buffers`
        buffers;
      - a live window of the four largest modules' own parameters, a
        prefetch bucket of half that, and reuse kept within the
        second-largest module's worth of the trace;
      - `coordinator` keys as given override those.
    `dtype` (torch.float16 / bfloat16) sizes the buffers for a model
    offloaded with that dtype. Meta-device models work (shapes only).
    `memory_limit` (bytes): ValueError, itemised (memory_estimate), when
    ztier's host memory with these settings would exceed it."""
    if memory_limit is not None:
        check_memory(model, memory_limit, buffer_count=buffer_count,
                     sub_group_size=sub_group_size, optimizer_buffers=optimizer_buffers,
                     gradients=gradients, dtype=dtype)
    largest, live, second, element_bytes, _ = _sizes(model)
    if dtype is not None:
        element_bytes = _element_bytes(dtype)
    if gradients not in ("nvme", "host"):
        raise ValueError(f"ztier.torch: gradients must be 'nvme' or 'host', not {gradients!r}")
    coord = {"max_reuse_distance": int(second), "prefetch_bucket_size": int(live // 2)}
    coord.update(coordinator or {})
    return ("tiers:\n"
            "  params: nvme\n"
            f"  gradients: {gradients}\n"
            f"  device: {{max_live_parameters: {int(live)}}}\n"
            "  host: {pin_memory: false}\n"
            f"  nvme: {{paths: [\"{path}\"], buffer_count: {buffer_count}, "
            f"buffer_size: {largest}, buffer_element_bytes: {element_bytes}}}\n"
            "io: {register_buffers: false}\n"
            f"optimizer: {{paths: [\"{path}\"], sub_group_size: {int(sub_group_size)}, "
            f"buffer_count: {optimizer_buffers}}}\n"
            "coordinator: {" + ", ".join(f"{k}: {v}" for k, v in coord.items()) + "}\n")


def _element_bytes(dtype) -> int:
    import torch
    return torch.empty(0, dtype=dtype).element_size()


def memory_estimate(model: nn.Module, *, buffer_count: int = 4, sub_group_size: float = 4e6,
                    optimizer_buffers: int = 4, gradients: str = "nvme", dtype=None,
                    grad_staging_bytes: int = 16 << 20) -> Dict[str, int]:
    """Host bytes ztier itself holds with model_config's settings (the same
    arguments), by item; activations and torch's own memory are the
    trainer's. The items, each in bytes:
      swap_buffers     buffer_count x the largest parameter
      live_window      the gathered parameters (host emulation: host memory)
      optimizer        optimizer_buffers sub-groups of state (12 B/element)
                       plus their gradients, and the updated-parameter queue
      gradients        all partitions (gradients: host) or staging and, on
                       a GPU or at world size > 1, one partition-sized scratch
      full_gradients   the two largest parameters' full gradients before hand-in
    """
    largest, live, second, element_bytes, total = _sizes(model)
    if dtype is not None:
        element_bytes = _element_bytes(dtype)
    sg = int(sub_group_size)
    est = {
        "swap_buffers": buffer_count * largest * element_bytes,
        "live_window": live * element_bytes,
        "optimizer": optimizer_buffers * sg * (12 + element_bytes)
        + max(largest * element_bytes, 2 * sg * 4),
        "gradients": (total * element_bytes if gradients == "host"
                      else grad_staging_bytes + largest * element_bytes),  # scratch: at most
        "full_gradients": (largest + second) * element_bytes,
    }
    est["total"] = sum(est.values())
    return est


def check_memory(model: nn.Module, limit_bytes: int, **kwargs) -> Dict[str, int]:
    """memory_estimate(model, **kwargs), or ValueError with its items when
    the total is above `limit_bytes`."""
    est = memory_estimate(model, **kwargs)
    if est["total"] > limit_bytes:
        rows = "\n".join(f"  {k:15s} {v / 2**30:8.2f} GiB" for k, v in est.items())
        raise ValueError(
            f"ztier.torch: this offload needs about {est['total'] / 2**30:.2f} GiB of host "
            f"memory for ztier alone, more than the {limit_bytes / 2**30:.2f} GiB given:\n{rows}\n"
            "Lower buffer_count / optimizer_buffers / sub_group_size, use gradients='nvme', or "
            "give more memory (`ztier plan` prints the per-tier figures for a whole run)")
    return est
