"""Reads a torch.save'd state dict one tensor at a time, never the whole file.

    with StateDictFile("model.pt") as sd:          # reads only the pickled records
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

The legacy format (torch.save(..., _use_new_zipfile_serialization=False),
and what ztier.checkpoint_export writes) is a bare stream: pickle(magic
number) pickle(protocol version 1001) pickle(sys_info) pickle(the object)
pickle(list of storage keys), then for each key in that list its storage:
an int64 element count and the raw bytes. The object's tensors are the same
records as above, their persistent ids ('storage', <storage class>, key,
location, numel, view_metadata); a storage's element size is its class's
(the first record naming the key), so where each storage lies follows from
the key list without reading any of them.

Unpickling here calls nothing of torch's: the rebuild functions and storage
classes are replaced by lazy records, and any other global outside a small
allow-list is refused, so opening a file cannot run code from it. Tensors
come back on the CPU whatever device they were saved from.
"""

import collections
import dataclasses
import functools
import io
import os
import pickle
import struct
import zipfile
from typing import Dict, Iterator, List, Optional, Tuple

import torch

_MAGIC = 0x1950a86a20f9469cfc6c  # the legacy format's first pickle
_PROTOCOL = 1001  # its second
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
_COUNT = struct.Struct("<q")  # a legacy storage's element count, before its bytes


class StateDictError(ValueError):
    """The file is not a state dict this reader can stream, or is damaged."""


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage's bytes: numel elements of dtype, in zip entry
    <prefix>/data/<key> or after the legacy stream's pickles."""
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
        raise StateDictError("malformed tensor record")
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
        raise StateDictError("malformed parameter record")
    return dataclasses.replace(data, requires_grad=bool(requires_grad))


_REBUILD = {"_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_tensor_v3": _rebuild_tensor_v3,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter}


class _Unpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages become _Storage records.

    what names the pickle in errors; legacy: persistent ids have the legacy
    format's sixth element (view_metadata). storages: each key's first
    record, in the order the keys are first named."""

    def __init__(self, file, what: str, legacy: bool = False):
        super().__init__(file)
        self._what, self._legacy = what, legacy
        self.storages: Dict[str, _Storage] = {}

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
        raise StateDictError(f"{self._what} references {module}.{name}, which a state dict "
                             "does not need: refused (loading it could run arbitrary code)")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != (6 if self._legacy else 5)
                or pid[0] != "storage" or not isinstance(pid[1], torch.dtype)):
            raise StateDictError(f"unsupported persistent id in {self._what}: {pid!r}")
        if self._legacy and pid[5] is not None:  # a storage view: only old torch wrote these
            raise StateDictError(f"storage {pid[2]!r} is a view of another (view metadata "
                                 f"{pid[5]!r}): not supported")
        storage = _Storage(str(pid[2]), pid[1], int(pid[4]))
        self.storages.setdefault(storage.key, storage)
        return storage


@functools.lru_cache(maxsize=None)
def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class StateDictFile:
    """A torch.save'd state dict whose tensors are read one at a time.

    path: the file; key: the entry of the saved top-level mapping that holds
    the state dict (key="model" for {"model": sd, "optimizer": ...}), or
    None when the file is the state dict itself. Either format torch.save
    writes: the zip (default) or the legacy one (see the module's doc).
    Only the pickled records (names, shapes, dtypes, where each tensor's
    bytes lie) are read when opening. Not thread-safe: reads share one file
    position.
    """

    def __init__(self, path: str, key: Optional[str] = None):
        self._file = open(path, "rb")
        self._zip: Optional[zipfile.ZipFile] = None  # None: the legacy format
        try:
            self._open(path, key)
        except BaseException:
            self._file.close()
            raise

    def _open(self, path, key):
        magic = self._file.read(4)
        self._file.seek(0)
        self._offsets: Dict[str, int] = {}  # storage key -> file offset of its bytes, once read
        # legacy: storage key -> (file offset of its element count, its record).
        self._legacy: Dict[str, Tuple[int, _Storage]] = {}
        if magic[:1] == b"\x80":  # a bare pickle stream (PROTO opcode): the legacy format
            obj = self._open_legacy(path)
        else:
            obj = self._open_zip(path, magic)
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

    def _open_zip(self, path, magic):
        try:
            self._zip = zipfile.ZipFile(self._file)
        except zipfile.BadZipFile:
            what = "truncated or corrupt zip" if magic == b"PK\x03\x04" else \
                "not a zip archive nor a legacy torch.save stream"
            raise StateDictError(f"{path}: {what}, not a torch.save file") from None
        pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise StateDictError(f"{path}: no <prefix>/data.pkl entry: not a torch.save file")
        self._prefix = pkls[0][:-len("data.pkl")]
        byteorder = self._entry(self._prefix + "byteorder")  # torch 2.x writes it
        if byteorder is not None and self._zip.read(byteorder).strip() != b"little":
            raise StateDictError(f"{path}: big-endian tensor data is not supported")
        try:
            return _Unpickler(io.BytesIO(self._zip.read(pkls[0])), "data.pkl").load()
        except StateDictError as e:
            raise StateDictError(f"{path}: {e}") from None
        except Exception as e:  # damaged pickle or zip entry
            raise StateDictError(f"{path}: cannot read {pkls[0]}: {e}") from None

    def _open_legacy(self, path):
        """Reads the legacy stream's five pickles (from the file: the
        unpickler stops at each one's end) and places the storages after them."""
        what = "the legacy format's pickles"
        try:
            if _Unpickler(self._file, what, legacy=True).load() != _MAGIC:
                raise StateDictError("a pickle stream without torch's magic number: not a "
                                     "torch.save file")
            version = _Unpickler(self._file, what, legacy=True).load()
            if version != _PROTOCOL:
                raise StateDictError(f"legacy format protocol version {version!r} is not "
                                     f"supported (only {_PROTOCOL})")
            sys_info = _Unpickler(self._file, what, legacy=True).load()
            if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
                raise StateDictError("big-endian tensor data is not supported")
            records = _Unpickler(self._file, what, legacy=True)
            obj = records.load()
            keys = _Unpickler(self._file, what, legacy=True).load()
        except StateDictError as e:
            raise StateDictError(f"{path}: {e}") from None
        except Exception as e:  # damaged or truncated pickles
            raise StateDictError(f"{path}: cannot read {what}: {e!r}") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise StateDictError(f"{path}: the legacy format's storage list is malformed")
        pos = self._file.tell()  # the storages follow, in the list's order
        for k in keys:
            storage = records.storages.get(k)
            if storage is None or k in self._legacy:
                raise StateDictError(f"{path}: the storage list names {k!r} "
                                     f"{'which no tensor uses' if storage is None else 'twice'}")
            self._legacy[k] = (pos, storage)
            pos += _COUNT.size + storage.numel * _elem_size(storage.dtype)
        size = os.fstat(self._file.fileno()).st_size
        if pos > size:
            raise StateDictError(f"{path}: truncated: its storages end at byte {pos}, "
                                 f"the file has {size}")
        return obj

    def names(self) -> List[str]:
        """The tensors' names, in the order they were saved."""
        return list(self._tensors)

    def shape(self, name: str) -> torch.Size:
        return self._tensors[name].size

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reads tensor `name`: only the bytes its elements span, from its
        storage (a zip entry, or its place in a legacy file). Returns a new
        contiguous CPU tensor, or `out` filled in place (any device; it must
        have this shape and dtype)."""
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
            stored = self._stored_bytes(t.storage.key)
            have = t.storage.numel * _elem_size(t.storage.dtype)
            if stored is None or t.offset < 0 or min(t.stride, default=0) < 0 or \
                    begin + nbytes > min(have, stored):
                raise StateDictError(f"{name}: storage {t.storage.key!r} is missing, compressed, "
                                     "or smaller than the tensor")
            buf = bytearray(nbytes)
            self._file.seek(self._data_offset(t.storage.key) + begin)
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

    def _stored_bytes(self, key: str) -> Optional[int]:
        """How many bytes the file holds for storage `key`; None if it has
        none, or (zip) only compressed."""
        if self._zip is None:
            placed = self._legacy.get(key)
            return None if placed is None else placed[1].numel * _elem_size(placed[1].dtype)
        info = self._entry(f"{self._prefix}data/{key}")
        return None if info is None or info.compress_type != zipfile.ZIP_STORED else info.file_size

    def _data_offset(self, key: str) -> int:
        """Where storage `key`'s bytes start in the file. Zip: after its entry's
        local header, whose extra field may differ from the central directory's
        (torch pads it to align). Legacy: after its element count, checked
        against its record's (as torch.load checks it)."""
        if key not in self._offsets:
            if self._zip is None:
                pos, storage = self._legacy[key]
                self._file.seek(pos)
                head = self._file.read(_COUNT.size)
                count = _COUNT.unpack(head)[0] if len(head) == _COUNT.size else None
                if count != storage.numel:
                    raise StateDictError(f"storage {key!r}: the file gives {count} elements, "
                                         f"its record {storage.numel}: damaged")
                self._offsets[key] = pos + len(head)
            else:
                info = self._zip.getinfo(f"{self._prefix}data/{key}")
                self._file.seek(info.header_offset)
                head = self._file.read(_LOCAL_HEADER.size)
                if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
                    raise StateDictError(f"{info.filename}: bad zip local header")
                *_, name_len, extra_len = _LOCAL_HEADER.unpack(head)
                self._offsets[key] = info.header_offset + len(head) + name_len + extra_len
        return self._offsets[key]

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yields (name, tensor), reading each tensor when it is reached."""
        for name in self._tensors:
            yield name, self.read(name)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._file.close()

    def __enter__(self) -> "StateDictFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
