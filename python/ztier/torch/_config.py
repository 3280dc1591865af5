"""A config sized from the model it offloads."""

from __future__ import annotations

from torch import nn


def model_config(model: nn.Module, path: str, *, buffer_count: int = 4,
                 sub_group_size: float = 4e6, optimizer_buffers: int = 4,
                 coordinator: dict = None) -> str:
    """YAML text that offloads `model`'s parameters and optimizer state to
    NVMe under `path`: `buffer_count` swap buffers, each as large as the
    largest parameter (a partition never spans more than one), pageable
    (no memlock needed), optimizer sub-groups of `sub_group_size` elements
    with `optimizer_buffers` buffers, and `coordinator` keys as given."""
    params = list(model.parameters())
    if not params:
        raise ValueError("ztier.torch: the model has no parameters to offload")
    largest = max(p.numel() for p in params)
    element_bytes = max(p.element_size() for p in params)
    text = ("tiers:\n"
            "  params: nvme\n"
            "  host: {pin_memory: false}\n"
            f"  nvme: {{paths: [\"{path}\"], buffer_count: {buffer_count}, "
            f"buffer_size: {largest}, buffer_element_bytes: {element_bytes}}}\n"
            "io: {register_buffers: false}\n"
            f"optimizer: {{paths: [\"{path}\"], sub_group_size: {int(sub_group_size)}, "
            f"buffer_count: {optimizer_buffers}}}\n")
    if coordinator:
        text += "coordinator: {" + ", ".join(f"{k}: {v}" for k, v in coordinator.items()) + "}\n"
    return text
