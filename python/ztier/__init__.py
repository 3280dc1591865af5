"""ztier: NVMe offload memory tiering for training, from Python.

`ztier.Engine` is a thin ctypes binding of the C API (include/ztier/ztier.h);
`ztier.torch` (imported on demand: it needs PyTorch) offloads an nn.Module's
parameters through it. Errors are raised as ztier.ZtierError with the
status and the library's message.
"""

from ztier._capi import (DType, DeviceKind, Engine, LocalGroup, OptimizerKind, ParamInfo,
                         ParamState, StateArray, Status, ZtierError, checkpoint_export,
                         checkpoint_user_data, checkpoint_verify, load_library,
                         status_string, version, version_string)

__all__ = [
    "DType", "DeviceKind", "Engine", "LocalGroup", "OptimizerKind", "ParamInfo", "ParamState",
    "StateArray", "Status", "ZtierError", "checkpoint_export", "checkpoint_user_data",
    "checkpoint_verify", "load_library", "status_string", "version", "version_string",
]
