"""Reads a torch.save'd state dict one tensor at a time, never the whole file.

    with StateDictFile("model.pt") as sd:          # reads only data.pkl
        for name, tensor in sd:                    # one tensor in memory at a time
            ...
        sd.read("fc.weight", out=pinned_buffer)    # or fill a tensor in place

The format (torch.save's default zip format, torch 1.6 onwards): a zip
archive whose "<prefix>/data.pkl" pickles the object; each tensor pickles as
a call to torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks[, metadata]) whose storage is a pickle persistent id
('storage', <storage class>, key, location, numel). The storage's raw bytes,
little-endian and stored uncompressed, are the zip entry "<prefix>/data/<key>".
Torch 2.x also writes _rebuild_tensor_v3(..., dtype[, metadata]) over an
untyped (byte) storage for dtypes newer than its typed storages, and a
"<prefix>/byteorder" entry.

Unpickling here calls nothing of torch's: the rebuild functions and storage
classes are replaced by lazy records, and any other global outside a small
allow-list is refused, so opening a file cannot run code from it. Tensors
come back on the CPU whatever device they were saved from.
"""

import collections
import dataclasses
import functools
import io
import pickle
import struct
import zipfile
from typing import Dict, Iterator, List, Optional, Tuple

import torch

_LEGACY = ("legacy torch.save format (_use_new_zipfile_serialization=False) is not supported: "
           "re-save with torch.save's default")
_STORAGE_DTYPES = {  # storage class name in the pickle -> element dtype
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8"}  # untyped: bytes
# torch.float32 etc., read from the module's namespace: getattr(torch, name)
# could import a lazily loaded torch submodule named by the file.
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes


class StateDictError(ValueError):
    """The file is not a state dict this reader can stream, or is damaged."""


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage's bytes: zip entry <prefix>/data/<key>, numel elements of dtype."""
    key: str
    dtype: torch.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class _Lazy:
    """A tensor not read yet; offset and stride count elements of dtype."""
    storage: _Storage
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: Tuple[int, ...]
    requires_grad: bool


def _lazy(storage, offset, size, stride, requires_grad, dtype, metadata) -> _Lazy:
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise StateDictError("malformed tensor record in data.pkl")
    if metadata and any(metadata.values()):  # e.g. conj/neg bits of a lazy view
        raise StateDictError(f"tensor metadata {dict(metadata)} is not supported")
    return _Lazy(storage, dtype, int(offset), torch.Size(size), tuple(stride), bool(requires_grad))


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _lazy(storage, offset, size, stride, requires_grad, getattr(storage, "dtype", None),
                 metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _lazy(storage, offset, size, stride, requires_grad, dtype, metadata)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, _Lazy):
        raise StateDictError("malformed parameter record in data.pkl")
    return dataclasses.replace(data, requires_grad=bool(requires_grad))


_REBUILD = {"_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_tensor_v3": _rebuild_tensor_v3,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter}


class _Unpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages become _Storage records."""

    def find_class(self, module, name):
        if module == "torch._utils" and name in _REBUILD:
            return _REBUILD[name]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return getattr(torch, _STORAGE_DTYPES[name])  # the class stands for its dtype
        if module == "torch" and name in ("Size", "device"):
            return getattr(torch, name)
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):  # how pickle protocol 2 writes bytes
            import _codecs
            return _codecs.encode
        raise StateDictError(f"data.pkl references {module}.{name}, which a state dict does "
                             "not need: refused (loading it could run arbitrary code)")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], torch.dtype)):
            raise StateDictError(f"unsupported persistent id in data.pkl: {pid!r}")
        return _Storage(str(pid[2]), pid[1], int(pid[4]))


@functools.lru_cache(maxsize=None)
def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class StateDictFile:
    """A torch.save'd state dict whose tensors are read one at a time.

    path: the file; key: the entry of the saved top-level mapping that holds
    the state dict (key="model" for {"model": sd, "optimizer": ...}), or
    None when the file is the state dict itself. Only data.pkl (names,
    shapes, dtypes, where each tensor's bytes lie) is read when opening.
    Not thread-safe: reads share one file position.
    """

    def __init__(self, path: str, key: Optional[str] = None):
        self._file = open(path, "rb")
        try:
            self._open(path, key)
        except BaseException:
            self._file.close()
            raise

    def _open(self, path, key):
        magic = self._file.read(4)
        try:
            self._zip = zipfile.ZipFile(self._file)
        except zipfile.BadZipFile:
            if magic[:1] == b"\x80":  # a bare pickle stream: the pre-1.6 format
                raise StateDictError(f"{path}: {_LEGACY}") from None
            what = "truncated or corrupt zip" if magic == b"PK\x03\x04" else "not a zip archive"
            raise StateDictError(f"{path}: {what}, not a torch.save file") from None
        pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise StateDictError(f"{path}: no <prefix>/data.pkl entry: not a torch.save file")
        self._prefix = pkls[0][:-len("data.pkl")]
        byteorder = self._entry(self._prefix + "byteorder")  # torch 2.x writes it
        if byteorder is not None and self._zip.read(byteorder).strip() != b"little":
            raise StateDictError(f"{path}: big-endian tensor data is not supported")
        try:
            obj = _Unpickler(io.BytesIO(self._zip.read(pkls[0]))).load()
        except StateDictError as e:
            raise StateDictError(f"{path}: {e}") from None
        except Exception as e:  # damaged pickle or zip entry
            raise StateDictError(f"{path}: cannot read {pkls[0]}: {e}") from None
        if key is not None:
            if not isinstance(obj, dict) or key not in obj:
                found = sorted(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise StateDictError(f"{path}: no key {key!r} at the top level (found {found})")
            obj = obj[key]
        if not isinstance(obj, dict):
            raise StateDictError(f"{path}: holds a {type(obj).__name__}, not a mapping of "
                                 "names to tensors")
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, _Lazy)]
        if bad:
            nested = [k for k, v in obj.items() if isinstance(v, dict)]
            hint = f"; its entries that are mappings: {nested}: select one with key=" \
                if nested and key is None else ""
            raise StateDictError(f"{path}: not a flat mapping of names to tensors (entries "
                                 f"that are not tensors: {bad[:8]}){hint}")
        self._tensors: Dict[str, _Lazy] = dict(obj)
        self._offsets: Dict[str, int] = {}  # zip entry name -> byte offset of its data in the file

    def names(self) -> List[str]:
        """The tensors' names, in the order they were saved."""
        return list(self._tensors)

    def shape(self, name: str) -> torch.Size:
        return self._tensors[name].size

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reads tensor `name`: only the bytes its elements span, from its
        storage's zip entry. Returns a new contiguous CPU tensor, or `out`
        filled in place (any device; it must have this shape and dtype)."""
        t = self._tensors[name]
        if out is not None and (out.shape != t.size or out.dtype != t.dtype):
            raise StateDictError(f"{name}: out is {out.dtype} {tuple(out.shape)}, "
                                 f"the file has {t.dtype} {tuple(t.size)}")
        if t.size.numel() == 0:
            result = torch.empty(t.size, dtype=t.dtype)
        else:
            # Elements spanned from the first (offset) to the last; strides are >= 0.
            span = 1 + sum((n - 1) * s for n, s in zip(t.size, t.stride))
            elem = _elem_size(t.dtype)
            begin, nbytes = t.offset * elem, span * elem  # bytes into the storage
            info = self._entry(f"{self._prefix}data/{t.storage.key}")
            have = t.storage.numel * _elem_size(t.storage.dtype)
            if info is None or info.compress_type != zipfile.ZIP_STORED or t.offset < 0 or \
                    min(t.stride, default=0) < 0 or begin + nbytes > min(have, info.file_size):
                raise StateDictError(f"{name}: storage {t.storage.key!r} is missing, compressed, "
                                     "or smaller than the tensor")
            buf = bytearray(nbytes)
            self._file.seek(self._data_offset(info) + begin)
            if self._file.readinto(buf) != nbytes:
                raise StateDictError(f"{name}: file truncated")
            result = torch.frombuffer(buf, dtype=t.dtype)  # shares buf, no copy
            result = result.as_strided(t.size, t.stride).contiguous()  # copies only views
        if out is not None:
            with torch.no_grad():
                return out.copy_(result)
        return result.requires_grad_() if t.requires_grad else result  # as saved

    def _entry(self, name: str) -> Optional[zipfile.ZipInfo]:
        try:
            return self._zip.getinfo(name)
        except KeyError:
            return None

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where an entry's bytes start: after its local header, whose extra
        field may differ from the central directory's (torch pads it to align)."""
        if info.filename not in self._offsets:
            self._file.seek(info.header_offset)
            head = self._file.read(_LOCAL_HEADER.size)
            if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
                raise StateDictError(f"{info.filename}: bad zip local header")
            *_, name_len, extra_len = _LOCAL_HEADER.unpack(head)
            self._offsets[info.filename] = info.header_offset + len(head) + name_len + extra_len
        return self._offsets[info.filename]

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yields (name, tensor), reading each tensor when it is reached."""
        for name in self._tensors:
            yield name, self.read(name)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self) -> "StateDictFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
