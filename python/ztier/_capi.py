"""ctypes binding of the ztier C API (include/ztier/ztier.h).

No build step: the shared library is found, in this order (the first that
loads and has every function this binding declares wins):
  1. $ZTIER_LIBRARY, when set (then nothing else is tried);
  2. next to this package (ztier/libztier.so*);
  3. a build folder of the source tree this package sits in, when it is
     used from there (build/lib/libztier.so, else the newest
     build*/lib/libztier.so that is not a sanitizer build): a checkout's own
     build comes before any installed copy;
  4. the install prefix's library folder: the one `cmake --install` recorded
     in ztier/_install_paths.py, then sys.prefix/lib and
     sys.prefix/lib/<multiarch> (a venv or prefix that holds both);
  5. the dynamic loader's search path (LD_LIBRARY_PATH, ldconfig's cache):
     libztier.so.0, then what ctypes.util.find_library("ztier") names.
The OSError raised when none loads lists every place tried and why it failed.
Every failing call raises ZtierError carrying the status and the library's
message.

Buffers: calls that take memory accept an int address, a torch tensor
(its data_ptr()), a ctypes object, or a writable buffer (bytearray,
memoryview, array). Sizes are elements unless a name ends in _bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import enum
import glob
import os
import sys
import sysconfig
from typing import Iterable, NamedTuple, Optional, Sequence

__all__ = [
    "Status", "DType", "DeviceKind", "ParamState", "ZtierError", "Engine", "LocalGroup",
    "ParamInfo", "OptimizerKind", "StateArray", "load_library", "version", "version_string",
    "checkpoint_user_data", "checkpoint_verify", "checkpoint_export",
]


class Status(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    IO_ERROR = 3
    UNAVAILABLE = 4
    RESOURCE_EXHAUSTED = 5
    FAILED_PRECONDITION = 6
    CORRUPTION = 7
    CANCELLED = 8
    INTERNAL = 9
    INVALID_HANDLE = 10
    BAD_STRUCT_SIZE = 11
    ENGINE_FAILED = 12


class DType(enum.IntEnum):
    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2
    UINT8 = 3


DTYPE_BYTES = {DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BFLOAT16: 2, DType.UINT8: 1}


class CommKind(enum.IntEnum):
    NONE = 0
    LOCAL_GROUP = 1
    NCCL_UNIQUE_ID = 2
    NCCL_COMM = 3
    GLOO = 4


class DeviceKind(enum.IntEnum):
    AUTO = 0
    HOST = 1
    CUDA = 2


class ParamState(enum.IntEnum):
    NOT_AVAILABLE = 0
    INFLIGHT = 1
    AVAILABLE = 2


class ZtierError(RuntimeError):
    """A failed ztier call: `status` (Status) and the library's `message`."""

    def __init__(self, status: int, message: str):
        try:
            self.status = Status(status)
        except ValueError:
            self.status = status
        self.message = message
        name = self.status.name if isinstance(self.status, Status) else str(status)
        super().__init__(f"{name}: {message}")


class _EngineOptions(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("config_path", ctypes.c_char_p),
        ("config_text", ctypes.c_char_p),
        ("rank", ctypes.c_uint32),
        ("world_size", ctypes.c_uint32),
        ("comm", ctypes.c_int),
        ("local_group", ctypes.c_void_p),
        ("nccl_unique_id", ctypes.c_void_p),
        ("nccl_unique_id_bytes", ctypes.c_size_t),
        ("nccl_comm", ctypes.c_void_p),
        ("device", ctypes.c_int),
        ("cuda_device", ctypes.c_int32),
        # ZTIER_COMM_GLOO (a later header; the library is told the size)
        ("gloo_store_path", ctypes.c_char_p),
        ("gloo_store", ctypes.c_void_p),
        ("gloo_prefix", ctypes.c_char_p),
    ]


_STORE_SET = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                              ctypes.c_size_t)
_STORE_GET = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint32)


class _Store(ctypes.Structure):
    _fields_ = [
        ("context", ctypes.c_void_p),
        ("set", _STORE_SET),
        ("get", _STORE_GET),
    ]


class _ParamInfo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("numel", ctypes.c_uint64),
        ("partition_numel", ctypes.c_uint64),
        ("partition_offset", ctypes.c_uint64),
        ("dtype", ctypes.c_int),
        ("state", ctypes.c_int),
        ("has_grad", ctypes.c_int),
    ]


class _Stats(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("steps", ctypes.c_uint64),
        ("fetch_calls", ctypes.c_uint64),
        ("demand_gathers", ctypes.c_uint64),
        ("prefetch_gathers", ctypes.c_uint64),
        ("releases", ctypes.c_uint64),
        ("nvme_reads", ctypes.c_uint64),
        ("nvme_bytes_read", ctypes.c_uint64),
        ("nvme_bytes_written", ctypes.c_uint64),
        ("grad_reduces", ctypes.c_uint64),
        ("live_numel", ctypes.c_uint64),
        ("peak_live_numel", ctypes.c_uint64),
        ("peak_swap_buffers", ctypes.c_uint32),
        ("trace_mode", ctypes.c_uint32),
        ("stall_nvme_s", ctypes.c_double),
        ("stall_device_s", ctypes.c_double),
        ("fetch_calls_with_demand", ctypes.c_uint64),
        ("trace_orders", ctypes.c_uint64),
        ("trace_switches", ctypes.c_uint64),
        ("trace_resyncs", ctypes.c_uint64),
        ("trace_off", ctypes.c_uint64),
        ("hints", ctypes.c_uint64),
        ("hint_gathers", ctypes.c_uint64),
        ("speculative_gathers", ctypes.c_uint64),
        ("speculation_hits", ctypes.c_uint64),
        ("speculation_misses", ctypes.c_uint64),
        ("speculation_wasted", ctypes.c_uint64),
        ("repacks", ctypes.c_uint64),
    ]


class OptimizerKind(enum.IntEnum):
    ADAMW = 0
    ADAM = 1


class StateArray(enum.IntEnum):
    MASTER = 0
    EXP_AVG = 1
    EXP_AVG_SQ = 2


class _OptimizerOptions(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("kind", ctypes.c_int),
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("bias_correction", ctypes.c_int),
        ("grad_scale", ctypes.c_double),
    ]


class _GradStats(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("sq_norm", ctypes.c_double),
        ("count", ctypes.c_uint64),
        ("nonfinite", ctypes.c_int),
        ("tier", ctypes.c_int),
    ]


class GradStats(NamedTuple):
    """This rank's held gradient partitions (ztier_grad_stats)."""
    sq_norm: float    # sum of squares of every element
    count: int        # parameters with a gradient partition
    nonfinite: bool   # some element is inf or NaN
    on_nvme: bool     # where they live (config tiers.gradients)


class _OptimizerStats(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("step", ctypes.c_uint64),
        ("elements", ctypes.c_uint64),
        ("sub_groups", ctypes.c_uint32),
        ("threads", ctypes.c_uint32),
        ("isa", ctypes.c_uint32),
        ("peak_buffers", ctypes.c_uint32),
        ("slot_bytes", ctypes.c_uint64),
        ("bytes_read", ctypes.c_uint64),
        ("bytes_written", ctypes.c_uint64),
        ("param_bytes", ctypes.c_uint64),
        ("step_s", ctypes.c_double),
        ("read_wait_s", ctypes.c_double),
        ("update_s", ctypes.c_double),
        ("drain_s", ctypes.c_double),
    ]


class ParamInfo(NamedTuple):
    numel: int
    partition_numel: int
    partition_offset: int
    dtype: DType
    state: ParamState
    has_grad: bool


_c = ctypes
_VP = _c.c_void_p
_U64 = _c.c_uint64
_SIGNATURES = {
    "ztier_status_string": (_c.c_char_p, [_c.c_int]),
    "ztier_last_error": (_c.c_char_p, []),
    "ztier_version": (_c.c_int, [_c.POINTER(_c.c_uint32)] * 3),
    "ztier_version_string": (_c.c_char_p, []),
    "ztier_local_group_create": (_c.c_int, [_c.c_uint32, _c.POINTER(_VP)]),
    "ztier_local_group_destroy": (_c.c_int, [_VP]),
    "ztier_engine_options_init_sized": (_c.c_int, [_c.POINTER(_EngineOptions), _c.c_size_t]),
    "ztier_engine_create": (_c.c_int, [_c.POINTER(_EngineOptions), _c.POINTER(_VP)]),
    "ztier_engine_destroy": (_c.c_int, [_VP]),
    "ztier_param_register": (_c.c_int, [_VP, _U64, _U64, _c.c_int, _VP]),
    "ztier_module_register": (_c.c_int, [_VP, _U64, _c.c_char_p, _c.POINTER(_U64),
                                         _c.c_size_t, _c.c_int64]),
    "ztier_module_fetch": (_c.c_int, [_VP, _U64, _c.c_int]),
    "ztier_module_hint": (_c.c_int, [_VP, _c.POINTER(_U64), _c.c_size_t]),
    "ztier_module_release": (_c.c_int, [_VP, _U64, _c.c_int]),
    "ztier_param_data": (_c.c_int, [_VP, _U64, _c.POINTER(_VP)]),
    "ztier_param_grad_reduce": (_c.c_int, [_VP, _U64, _VP]),
    "ztier_param_grad_accumulate": (_c.c_int, [_VP, _U64, _VP]),
    "ztier_grad_stats": (_c.c_int, [_VP, _VP]),
    "ztier_step_end": (_c.c_int, [_VP]),
    "ztier_exchange_u64": (_c.c_int, [_VP, _U64, _c.POINTER(_U64), _c.c_size_t]),
    "ztier_release_all": (_c.c_int, [_VP, _c.c_int]),
    "ztier_param_info": (_c.c_int, [_VP, _U64, _c.POINTER(_ParamInfo)]),
    "ztier_partition_read": (_c.c_int, [_VP, _U64, _VP, _c.c_size_t]),
    "ztier_partition_write": (_c.c_int, [_VP, _U64, _VP, _c.c_size_t]),
    "ztier_grad_partition_read": (_c.c_int, [_VP, _U64, _VP, _c.c_size_t]),
    "ztier_grad_partition_write": (_c.c_int, [_VP, _U64, _VP, _c.c_size_t]),
    "ztier_grad_clear": (_c.c_int, [_VP]),
    "ztier_engine_stats": (_c.c_int, [_VP, _c.POINTER(_Stats)]),
    "ztier_engine_async_error": (_c.c_int, [_VP, _c.POINTER(_c.c_int), _c.c_char_p,
                                            _c.c_size_t]),
    "ztier_engine_clear_async_error": (_c.c_int, [_VP]),
    "ztier_engine_device": (_c.c_int, [_VP, _c.POINTER(_c.c_int), _c.POINTER(_c.c_int32)]),
    "ztier_engine_describe": (_c.c_int, [_VP, _c.c_char_p, _c.c_size_t]),
    "ztier_optimizer_options_init": (_c.c_int, [_c.POINTER(_OptimizerOptions)]),
    "ztier_optimizer_create": (_c.c_int, [_VP, _c.POINTER(_OptimizerOptions)]),
    "ztier_optimizer_step": (_c.c_int, [_VP, _c.POINTER(_OptimizerOptions)]),
    "ztier_optimizer_create_groups": (_c.c_int, [_VP, _c.POINTER(_OptimizerOptions), _c.c_size_t,
                                                 _c.POINTER(_U64), _c.POINTER(_c.c_uint32),
                                                 _c.c_size_t]),
    "ztier_optimizer_step_groups": (_c.c_int, [_VP, _c.POINTER(_OptimizerOptions),
                                               _c.c_size_t]),
    "ztier_optimizer_step_begin": (_c.c_int, [_VP, _c.POINTER(_OptimizerOptions),
                                              _c.c_size_t]),
    "ztier_optimizer_step_finish": (_c.c_int, [_VP, _c.POINTER(_OptimizerOptions),
                                               _c.c_size_t]),
    "ztier_optimizer_step_cancel": (_c.c_int, [_VP]),
    "ztier_optimizer_state_read": (_c.c_int, [_VP, _U64, _c.c_int, _VP, _c.c_size_t]),
    "ztier_optimizer_stats": (_c.c_int, [_VP, _c.POINTER(_OptimizerStats)]),
    "ztier_param_set_name": (_c.c_int, [_VP, _U64, _c.c_char_p, _c.POINTER(_U64), _c.c_size_t]),
    "ztier_checkpoint_save": (_c.c_int, [_VP, _c.c_char_p, _VP, _c.c_size_t]),
    "ztier_checkpoint_load": (_c.c_int, [_VP, _c.c_char_p]),
    "ztier_checkpoint_save_async": (_c.c_int, [_VP, _c.c_char_p, _VP, _c.c_size_t]),
    "ztier_checkpoint_wait": (_c.c_int, [_VP]),
    "ztier_checkpoint_user_data": (_c.c_int, [_c.c_char_p, _VP, _c.c_size_t,
                                              _c.POINTER(_c.c_size_t)]),
    "ztier_checkpoint_rank_user_data": (_c.c_int, [_c.c_char_p, _c.c_uint32, _VP, _c.c_size_t,
                                                   _c.POINTER(_c.c_size_t)]),
    "ztier_checkpoint_verify": (_c.c_int, [_c.c_char_p, _c.c_char_p, _c.c_size_t]),
    "ztier_checkpoint_export": (_c.c_int, [_c.c_char_p, _c.c_char_p]),
}

_lib = None


_SONAME = "libztier.so.0"  # capi/CMakeLists.txt: SOVERSION 0


class _Candidate(NamedTuple):
    """A library to try: `path` for ctypes.CDLL, and `where` for the error
    (the place it stands for when nothing exists there)."""
    path: Optional[str]
    where: str


def _in_folder(folder: str) -> _Candidate:
    for name in (_SONAME, "libztier.so"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return _Candidate(path, path)
    return _Candidate(None, os.path.join(folder, _SONAME))


def _recorded_libdir(here: str) -> Optional[str]:
    """The library folder `cmake --install` recorded beside the package
    (python/CMakeLists.txt), relative to it; None for a pip install or the
    source tree."""
    try:
        from ztier import _install_paths  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return os.path.normpath(os.path.join(here, _install_paths.LIBDIR))


def _prefix_libdirs(here: str) -> Iterable[str]:
    recorded = _recorded_libdir(here)
    if recorded:
        yield recorded
    yield os.path.join(sys.prefix, "lib")
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        yield os.path.join(sys.prefix, "lib", multiarch)


def _loader_candidates() -> Iterable[_Candidate]:
    search = "the dynamic loader's path (LD_LIBRARY_PATH={}, ldconfig)".format(
        os.environ.get("LD_LIBRARY_PATH") or "unset")
    yield _Candidate(_SONAME, f"{_SONAME} on {search}")
    found = ctypes.util.find_library("ztier")
    if found and found != _SONAME:
        yield _Candidate(found, f"{found} (ctypes.util.find_library)")


def _build_candidates(here: str) -> Iterable[_Candidate]:
    root = os.path.dirname(os.path.dirname(here))  # python/ztier -> source root
    pattern = os.path.join(root, "build*", "lib", "libztier.so")
    if not os.path.isfile(os.path.join(root, "capi", "CMakeLists.txt")):
        return  # an installed package: no source tree around it
    built = [p for p in glob.glob(pattern)
             if not _sanitized(os.path.dirname(os.path.dirname(p)))]
    # build/ (scripts/build.sh) first, then the newest.
    built.sort(key=lambda p: (os.path.basename(os.path.dirname(os.path.dirname(p))) != "build",
                              -os.path.getmtime(p)))
    if not built:
        yield _Candidate(None, pattern + " (source tree, none built)")
    for p in built:
        yield _Candidate(p, p)


def _candidates() -> Iterable[_Candidate]:
    env = os.environ.get("ZTIER_LIBRARY")
    if env:
        yield _Candidate(env, f"{env} ($ZTIER_LIBRARY)")
        return
    here = os.path.dirname(os.path.abspath(__file__))
    beside = sorted(glob.glob(os.path.join(here, "libztier.so*")))
    yield from (_Candidate(p, p) for p in beside)
    if not beside:
        yield _Candidate(None, os.path.join(here, "libztier.so*"))
    # A package used from its source tree (PYTHONPATH=python) is a developer's
    # checkout: its own build comes before any installed copy.
    yield from _build_candidates(here)
    seen = set()
    for folder in _prefix_libdirs(here):
        if folder not in seen:
            seen.add(folder)
            yield _in_folder(folder)
    yield from _loader_candidates()


def _sanitized(build_dir: str) -> bool:
    """True for a sanitizer build: its library aborts an uninstrumented
    interpreter at load time instead of failing to load."""
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("ZTIER_SANITIZE:"):
                    return line.strip().split("=", 1)[1] != ""
    except OSError:
        pass
    return False


def _try_load(candidate: _Candidate):
    """(library, None) when `candidate` loads and has every function of this
    binding, else (None, why not)."""
    if candidate.path is None:
        return None, "no such file"
    if os.sep in candidate.path and not os.path.exists(candidate.path):
        return None, "no such file"
    try:
        lib = ctypes.CDLL(candidate.path)
    except OSError as e:  # e.g. a sanitizer build, or not on the loader's path
        return None, str(e)
    missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if missing:  # a library older than this binding
        return None, f"lacks {missing[0]}: older than this binding"
    return lib, None


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """Loads libztier (once) and declares every function's signature."""
    global _lib
    if _lib is not None and path is None:
        return _lib
    tried = []
    for candidate in ([_Candidate(path, path)] if path else _candidates()):
        lib, why = _try_load(candidate)
        if lib is None:
            tried.append(f"{candidate.where}: {why}")
            continue
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        _lib = lib
        return lib
    raise OSError(
        "libztier.so not found; tried:\n  {}\nSet ZTIER_LIBRARY to the library's path, add "
        "its folder to LD_LIBRARY_PATH, install it into this Python's prefix "
        "(cmake --install <build> --prefix {}), or build it (cmake --build <build> "
        "--target ztier_shared)".format("\n  ".join(tried) or "nothing", sys.prefix))


def _check(status: int) -> None:
    if status != 0:
        raise ZtierError(status, load_library().ztier_last_error().decode(errors="replace"))


def version() -> tuple:
    """The loaded library's (major, minor, patch)."""
    v = [ctypes.c_uint32() for _ in range(3)]
    _check(load_library().ztier_version(*[ctypes.byref(x) for x in v]))
    return tuple(x.value for x in v)


def version_string() -> str:
    return load_library().ztier_version_string().decode()


def status_string(status: int) -> str:
    return load_library().ztier_status_string(int(status)).decode()


def checkpoint_user_data(path: str, rank: Optional[int] = None) -> bytes:
    """The user data rank 0 (or `rank`) of the saving run stored in checkpoint
    `path` (checked against its CRC)."""
    lib = load_library()
    size = ctypes.c_size_t()

    def call(out, capacity):
        if rank is None:
            return lib.ztier_checkpoint_user_data(os.fsencode(path), out, capacity,
                                                  ctypes.byref(size))
        return lib.ztier_checkpoint_rank_user_data(os.fsencode(path), rank, out, capacity,
                                                   ctypes.byref(size))
    _check(call(None, 0))
    out = ctypes.create_string_buffer(max(1, size.value))
    _check(call(out, size.value))
    return out.raw[:size.value]


def checkpoint_verify(path: str) -> str:
    """Checks every file and chunk of checkpoint `path`: its one-line summary,
    or ZtierError naming what is wrong and where."""
    out = ctypes.create_string_buffer(4096)
    _check(load_library().ztier_checkpoint_verify(os.fsencode(path), out, len(out)))
    return out.value.decode(errors="replace")


def checkpoint_export(path: str, out_path: str) -> None:
    """Writes checkpoint `path`'s full-precision weights as a torch.load file."""
    _check(load_library().ztier_checkpoint_export(os.fsencode(path), os.fsencode(out_path)))


def _address(buf) -> int:
    """The address of `buf`'s memory (see the module docstring)."""
    if isinstance(buf, int):
        return buf
    if hasattr(buf, "data_ptr"):
        return buf.data_ptr()
    if isinstance(buf, ctypes._SimpleCData) or isinstance(buf, (ctypes.Array, ctypes.Structure)):
        return ctypes.addressof(buf)
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
    view = memoryview(buf)
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _nbytes(buf) -> Optional[int]:
    if hasattr(buf, "element_size") and hasattr(buf, "numel"):
        return buf.element_size() * buf.numel()
    if isinstance(buf, (ctypes.Array, ctypes.Structure, ctypes._SimpleCData)):
        return ctypes.sizeof(buf)
    if isinstance(buf, int):
        return None
    try:
        return memoryview(buf).nbytes
    except TypeError:
        return None


def _is_timeout(e: BaseException) -> bool:
    """Whether a store's get gave up waiting (torch raises a RuntimeError,
    DistStoreError from 2.x, that says so; others TimeoutError)."""
    if isinstance(e, TimeoutError):
        return True
    text = str(e).lower()
    return "timeout" in text or "timed out" in text


class _StoreAdapter:
    """A Python key-value store (set(key, value), blocking get(key)) as a
    ztier_store_t: the callbacks live as long as this object."""

    def __init__(self, store):
        if not (callable(getattr(store, "set", None)) and callable(getattr(store, "get", None))):
            raise TypeError("gloo_store needs set(key: str, value: bytes) and "
                            "get(key: str) -> bytes methods (as torch.distributed.Store)")
        self.store = store
        # A torch.distributed.Store waits as long as ztier asks (its wait());
        # any other store's get decides alone how long it waits.
        dist = sys.modules.get("torch.distributed")
        kind = getattr(dist, "Store", None)
        self._wait = store.wait if isinstance(kind, type) and isinstance(store, kind) else None
        self.error: Optional[BaseException] = None  # the last exception the store raised
        self._last = (None, b"")  # a value too large: its retry does not ask again
        self._set = _STORE_SET(self._on_set)
        self._get = _STORE_GET(self._on_get)
        self.struct = _Store(None, self._set, self._get)

    def _on_set(self, _ctx, key, value, nbytes) -> int:
        try:
            self.store.set(key.decode(), ctypes.string_at(value, nbytes) if nbytes else b"")
            return 0
        except BaseException as e:  # never across the C frames
            self.error = e
            return 2

    def _on_get(self, _ctx, key, value, capacity, nbytes, timeout_ms) -> int:
        try:
            name = key.decode()
            last, self._last = self._last, (None, b"")
            if last[0] == name and capacity >= len(last[1]):
                data = last[1]  # the retry of a value that did not fit
            else:
                if self._wait is not None:
                    self._wait([name], datetime.timedelta(milliseconds=timeout_ms))
                data = bytes(self.store.get(name))
                if len(data) > capacity:
                    self._last = (name, data)
            n = min(capacity, len(data))
            if n:
                ctypes.memmove(value, data, n)
            nbytes[0] = len(data)
            return 0
        except BaseException as e:  # never across the C frames
            self.error = e
            return 1 if _is_timeout(e) else 2


class LocalGroup:
    """`world_size` ranks as threads of this process (the local collective)."""

    def __init__(self, world_size: int):
        self._lib = load_library()
        self._handle = ctypes.c_void_p()
        _check(self._lib.ztier_local_group_create(world_size, ctypes.byref(self._handle)))
        self.world_size = world_size

    def close(self) -> None:
        if self._handle:
            _check(self._lib.ztier_local_group_destroy(self._handle))
            self._handle = ctypes.c_void_p()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to report to
            pass


class Engine:
    """One rank's ztier engine. Methods mirror the C calls (docs/c_api.md)."""

    def __init__(self, config_path: Optional[str] = None, config_text: Optional[str] = None,
                 rank: int = 0, world_size: int = 1, local_group: Optional[LocalGroup] = None,
                 nccl_unique_id: Optional[bytes] = None, device: str = "auto",
                 cuda_device: int = 0, gloo_store_path: Optional[str] = None,
                 gloo_store=None, gloo_prefix: Optional[str] = None):
        """Ranks as processes (the gloo collective, on CPUs): pass
        `gloo_store_path`, a directory every rank sees and no earlier group
        used with the same prefix, or `gloo_store`, any object with
        set(key: str, value: bytes) and get(key: str) -> bytes that blocks
        until the key exists (a torch.distributed.Store: it waits up to
        comm.timeout, through its wait(); another object's get decides how
        long it waits). `gloo_prefix` starts every key (None: "ztier")."""
        self._lib = load_library()
        self._handle = ctypes.c_void_p()
        opts = _EngineOptions()
        _check(self._lib.ztier_engine_options_init_sized(ctypes.byref(opts),
                                                         ctypes.sizeof(opts)))
        opts.config_path = config_path.encode() if config_path is not None else None
        opts.config_text = config_text.encode() if config_text is not None else None
        opts.rank = rank
        opts.world_size = world_size
        self._group = local_group  # the group must outlive the engine's creation
        self._uid = None
        if local_group is not None:
            opts.comm = CommKind.LOCAL_GROUP
            opts.local_group = local_group._handle
        elif nccl_unique_id is not None:
            self._uid = ctypes.create_string_buffer(bytes(nccl_unique_id), len(nccl_unique_id))
            opts.comm = CommKind.NCCL_UNIQUE_ID
            opts.nccl_unique_id = ctypes.addressof(self._uid)
            opts.nccl_unique_id_bytes = len(nccl_unique_id)
        store = None
        if gloo_store_path is not None or gloo_store is not None:
            if local_group is not None or nccl_unique_id is not None:
                raise ValueError("pass one of local_group, nccl_unique_id and a gloo store")
            if gloo_store_path is not None and gloo_store is not None:
                raise ValueError("pass one of gloo_store_path and gloo_store, not both")
            opts.comm = CommKind.GLOO
            if gloo_store_path is not None:
                opts.gloo_store_path = os.fsencode(gloo_store_path)
            else:
                store = _StoreAdapter(gloo_store)
                opts.gloo_store = ctypes.addressof(store.struct)
            opts.gloo_prefix = gloo_prefix.encode() if gloo_prefix is not None else None
        opts.device = {"auto": DeviceKind.AUTO, "host": DeviceKind.HOST,
                       "cuda": DeviceKind.CUDA}[device]
        opts.cuda_device = cuda_device
        status = self._lib.ztier_engine_create(ctypes.byref(opts), ctypes.byref(self._handle))
        if status != 0 and store is not None and store.error is not None:
            # What the store raised says more than the library can.
            message = self._lib.ztier_last_error().decode(errors="replace")
            raise ZtierError(status, f"{message} (the store raised: {store.error!r})")
        _check(status)
        del store  # used only inside ztier_engine_create
        self.rank = rank
        self.world_size = world_size

    # ---- lifetime ----
    def close(self) -> None:
        if self._handle:
            handle, self._handle = self._handle, ctypes.c_void_p()
            _check(self._lib.ztier_engine_destroy(handle))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to report to
            pass

    # ---- set-up ----
    def register_param(self, pid: int, numel: int, dtype: DType, full_data) -> None:
        _check(self._lib.ztier_param_register(self._handle, pid, numel, int(dtype),
                                              _address(full_data)))

    def register_module(self, mid: int, name: str, param_ids: Sequence[int],
                        parent: int = -1) -> None:
        ids = (ctypes.c_uint64 * max(1, len(param_ids)))(*param_ids)
        _check(self._lib.ztier_module_register(self._handle, mid, name.encode(), ids,
                                               len(param_ids), parent))

    # ---- hooks ----
    def fetch(self, mid: int, forward: bool = True) -> None:
        _check(self._lib.ztier_module_fetch(self._handle, mid, int(forward)))

    def hint(self, mids: Sequence[int]) -> None:
        """The modules that run next (e.g. the experts a router chose)."""
        ids = (ctypes.c_uint64 * max(1, len(mids)))(*mids)
        _check(self._lib.ztier_module_hint(self._handle, ids, len(mids)))

    def release(self, mid: int, backward: bool = False) -> None:
        _check(self._lib.ztier_module_release(self._handle, mid, int(backward)))

    def param_data(self, pid: int) -> int:
        out = ctypes.c_void_p()
        _check(self._lib.ztier_param_data(self._handle, pid, ctypes.byref(out)))
        return out.value

    def grad_reduce(self, pid: int, full_grad) -> None:
        _check(self._lib.ztier_param_grad_reduce(self._handle, pid, _address(full_grad)))

    def grad_accumulate(self, pid: int, full_grad) -> None:
        """As grad_reduce, adding to the partition held (micro-batches)."""
        _check(self._lib.ztier_param_grad_accumulate(self._handle, pid, _address(full_grad)))

    def grad_stats(self) -> GradStats:
        st = _GradStats()
        st.size = ctypes.sizeof(st)
        _check(self._lib.ztier_grad_stats(self._handle, ctypes.byref(st)))
        return GradStats(st.sq_norm, st.count, bool(st.nonfinite), st.tier == 1)

    def exchange_u64(self, value: int) -> list:
        """Every rank's `value` (a collective: see ztier_exchange_u64)."""
        out = (ctypes.c_uint64 * self.world_size)()
        _check(self._lib.ztier_exchange_u64(self._handle, value, out, self.world_size))
        return list(out)

    def step_end(self) -> None:
        _check(self._lib.ztier_step_end(self._handle))

    def release_all(self, persistent: bool = False) -> None:
        _check(self._lib.ztier_release_all(self._handle, int(persistent)))

    # ---- optimizer ----
    def param_info(self, pid: int) -> ParamInfo:
        info = _ParamInfo()
        info.size = ctypes.sizeof(info)
        _check(self._lib.ztier_param_info(self._handle, pid, ctypes.byref(info)))
        return ParamInfo(info.numel, info.partition_numel, info.partition_offset,
                         DType(info.dtype), ParamState(info.state), bool(info.has_grad))

    def _io(self, fn, pid: int, buf, nbytes: Optional[int], writes_buf: bool = False) -> None:
        # Partitions are host memory copied with memcpy: a tensor must be a
        # contiguous CPU tensor, and a read needs a writable buffer.
        if hasattr(buf, "is_contiguous"):
            if not buf.is_contiguous():
                raise ValueError("partition I/O needs a contiguous tensor")
            if getattr(buf, "device", None) is not None and buf.device.type != "cpu":
                raise ValueError("partition I/O needs a CPU tensor (partitions are host memory)")
        if writes_buf and isinstance(buf, bytes):
            raise ValueError("cannot read into immutable bytes; pass a bytearray or a tensor")
        if nbytes is None:
            nbytes = _nbytes(buf)
            if nbytes is None:
                raise ValueError("pass nbytes with a raw address")
        _check(fn(self._handle, pid, _address(buf), nbytes))

    def partition_read(self, pid: int, out, nbytes: Optional[int] = None) -> None:
        self._io(self._lib.ztier_partition_read, pid, out, nbytes, writes_buf=True)

    def partition_write(self, pid: int, data, nbytes: Optional[int] = None) -> None:
        self._io(self._lib.ztier_partition_write, pid, data, nbytes)

    def grad_partition_read(self, pid: int, out, nbytes: Optional[int] = None) -> None:
        self._io(self._lib.ztier_grad_partition_read, pid, out, nbytes, writes_buf=True)

    def grad_partition_write(self, pid: int, data, nbytes: Optional[int] = None) -> None:
        self._io(self._lib.ztier_grad_partition_write, pid, data, nbytes)

    def grad_clear(self) -> None:
        _check(self._lib.ztier_grad_clear(self._handle))

    # ---- ztier's own optimizer (state on config.optimizer's tier) ----
    def _optimizer_options(self, kind: OptimizerKind, lr: float, betas, eps: float,
                           weight_decay: float, bias_correction: bool,
                           grad_scale: float = 1.0) -> _OptimizerOptions:
        o = _OptimizerOptions()
        _check(self._lib.ztier_optimizer_options_init(ctypes.byref(o)))
        o.kind = int(kind)
        o.lr, (o.beta1, o.beta2), o.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        o.weight_decay = float(weight_decay)
        o.bias_correction = 1 if bias_correction else 0
        o.grad_scale = float(grad_scale)
        return o

    def optimizer_create(self, kind: OptimizerKind = OptimizerKind.ADAMW, lr: float = 1e-3,
                         betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                         bias_correction: bool = True) -> None:
        """Creates the engine's optimizer (after every parameter is registered)."""
        o = self._optimizer_options(kind, lr, betas, eps, weight_decay, bias_correction)
        _check(self._lib.ztier_optimizer_create(self._handle, ctypes.byref(o)))

    def optimizer_step(self, kind: Optional[OptimizerKind] = None, **hyper) -> None:
        """One pipelined optimizer step; keyword arguments (lr, betas, eps,
        weight_decay, bias_correction), when given, replace all of them: pass
        every one (as optimizer_create) or none."""
        if not hyper and kind is None:
            _check(self._lib.ztier_optimizer_step(self._handle, None))
            return
        o = self._optimizer_options(kind if kind is not None else OptimizerKind.ADAMW, **hyper)
        _check(self._lib.ztier_optimizer_step(self._handle, ctypes.byref(o)))

    def _group_options(self, kind: OptimizerKind, groups: Sequence[dict]):
        arr = (_OptimizerOptions * len(groups))()
        for k, g in enumerate(groups):
            arr[k] = self._optimizer_options(kind, **g)
        return arr

    def optimizer_create_groups(self, kind: OptimizerKind, groups: Sequence[dict],
                                param_groups: dict) -> None:
        """Creates the optimizer with torch-style parameter groups: `groups`
        is one dict of hyperparameters per group (lr, betas, eps,
        weight_decay, bias_correction), `param_groups` maps a parameter id to
        its group index. Unlisted parameters get no optimizer state."""
        ids = (ctypes.c_uint64 * max(1, len(param_groups)))(*param_groups.keys())
        gids = (ctypes.c_uint32 * max(1, len(param_groups)))(*param_groups.values())
        arr = self._group_options(kind, groups)
        _check(self._lib.ztier_optimizer_create_groups(self._handle, arr, len(groups), ids, gids,
                                                       len(param_groups)))

    def optimizer_step_groups(self, kind: OptimizerKind, groups: Sequence[dict]) -> None:
        """One pipelined optimizer step with each group's hyperparameters."""
        arr = self._group_options(kind, groups)
        _check(self._lib.ztier_optimizer_step_groups(self._handle, arr, len(groups)))

    def optimizer_step_begin(self, kind: OptimizerKind, groups: Sequence[dict]) -> None:
        """Begins the step during backward (see ztier_optimizer_step_begin)."""
        arr = self._group_options(kind, groups)
        _check(self._lib.ztier_optimizer_step_begin(self._handle, arr, len(groups)))

    def optimizer_step_finish(self, kind: OptimizerKind, groups: Sequence[dict]) -> None:
        """Ends a begun step (or runs a whole one): ztier_optimizer_step_finish."""
        arr = self._group_options(kind, groups)
        _check(self._lib.ztier_optimizer_step_finish(self._handle, arr, len(groups)))

    def optimizer_step_cancel(self) -> None:
        _check(self._lib.ztier_optimizer_step_cancel(self._handle))

    def optimizer_state_read(self, pid: int, array: StateArray, out,
                             nbytes: Optional[int] = None) -> None:
        if nbytes is None:
            nbytes = _nbytes(out)
            if nbytes is None:
                raise ValueError("pass nbytes with a raw address")
        _check(self._lib.ztier_optimizer_state_read(self._handle, pid, int(array), _address(out),
                                                    nbytes))

    # ---- checkpoints (docs/checkpoint.md) ----
    def param_set_name(self, pid: int, name: str, shape=()) -> None:
        dims = (_U64 * max(1, len(shape)))(*shape)
        _check(self._lib.ztier_param_set_name(self._handle, pid, name.encode(), dims, len(shape)))

    def checkpoint_save(self, path: str, user_data: bytes = b"") -> None:
        """Collective: every rank calls it with the same path."""
        _check(self._lib.ztier_checkpoint_save(self._handle, os.fsencode(path), user_data,
                                               len(user_data)))

    def checkpoint_save_async(self, path: str, user_data: bytes = b"") -> None:
        """Collective; returns once the parameters are written, the optimizer
        state follows in the background (see ztier_checkpoint_save_async)."""
        _check(self._lib.ztier_checkpoint_save_async(self._handle, os.fsencode(path), user_data,
                                                     len(user_data)))

    def checkpoint_wait(self) -> None:
        """Finishes a background save (collective); raises if it failed."""
        _check(self._lib.ztier_checkpoint_wait(self._handle))

    def checkpoint_load(self, path: str) -> None:
        _check(self._lib.ztier_checkpoint_load(self._handle, os.fsencode(path)))

    def optimizer_stats(self) -> dict:
        s = _OptimizerStats()
        s.size = ctypes.sizeof(s)
        _check(self._lib.ztier_optimizer_stats(self._handle, ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in _OptimizerStats._fields_ if name != "size"}

    # ---- observing ----
    def stats(self) -> dict:
        s = _Stats()
        s.size = ctypes.sizeof(s)
        _check(self._lib.ztier_engine_stats(self._handle, ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in _Stats._fields_ if name != "size"}

    def async_error(self) -> Optional[ZtierError]:
        """The first background failure (kept until clear_async_error), or None."""
        status = ctypes.c_int()
        msg = ctypes.create_string_buffer(4096)
        _check(self._lib.ztier_engine_async_error(self._handle, ctypes.byref(status), msg,
                                                  len(msg)))
        if status.value == 0:
            return None
        return ZtierError(status.value, msg.value.decode(errors="replace"))

    def clear_async_error(self) -> None:
        _check(self._lib.ztier_engine_clear_async_error(self._handle))

    def device(self) -> tuple:
        """(DeviceKind.HOST or DeviceKind.CUDA, CUDA ordinal or -1)."""
        kind = ctypes.c_int()
        ordinal = ctypes.c_int32()
        _check(self._lib.ztier_engine_device(self._handle, ctypes.byref(kind),
                                             ctypes.byref(ordinal)))
        return DeviceKind(kind.value), ordinal.value

    def describe(self) -> str:
        out = ctypes.create_string_buffer(1024)
        _check(self._lib.ztier_engine_describe(self._handle, out, len(out)))
        return out.value.decode()
