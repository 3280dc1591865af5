"""ztier.torch._load.StateDictFile streams a torch.save'd state dict.

Every dtype reads back bit for bit equal to torch.load; views, shared and
tied storages, empty and 0-d tensors; reading into `out`; nested checkpoints
with key=; clear errors for a truncated file, a file that is not a zip, and
a pickle naming another global (refused, nothing run); the torch 2.x record
forms (_rebuild_tensor_v3 over an untyped storage, v2's metadata argument,
_rebuild_parameter_with_state, the byteorder entry) from hand-written
pickles; and reading a ~200 MB file tensor by tensor with peak memory
growth well under the file's size, where torch.load needs all of it.
The legacy format (_use_new_zipfile_serialization=False) too: the same
contents (a module's state dict with BatchNorm's int64 counter, tied
weights, views) equal to torch.load, storages placed from the key list in
its order whatever their element sizes, errors for a truncated or damaged
stream, and the same memory bound. And the round trip: a model trained
offloaded, checkpointed and exported by ztier.checkpoint_export (the legacy
format) goes back in through offload(weights=<the export>), bit for bit.
Skips, saying why, without torch.
"""

import collections
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from torch_testing import ROOT, TORCH_MISSING, tmpdir, torch  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")


def bits(t):
    """t's bytes, to compare bit for bit (NaN payloads and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def random_tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


# A few pickle opcodes (protocol 2), to write the records torch 2.x writes
# and crafted ones torch 1.13 cannot produce.
def op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(s):
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def op_int(n):
    return b"J" + struct.pack("<i", n)


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def op_tensor(rebuild, storage_class, key, nbytes_or_numel, offset, size, stride, *extra,
              view=None):
    """rebuild(persistent storage, offset, size, stride, False, OrderedDict(), *extra).
    view: the legacy format's sixth persistent id element (b"N": None)."""
    storage = op_tuple(op_str("storage"), op_global("torch", storage_class), op_str(key),
                       op_str("cpu"), op_int(nbytes_or_numel),
                       *([] if view is None else [view])) + b"Q"
    hooks = op_global("collections", "OrderedDict") + b")R"
    return op_global("torch._utils", rebuild) + op_tuple(
        storage, op_int(offset), op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)),
        b"\x89", hooks, *extra) + b"R"


def op_dict(**items):
    return b"}(" + b"".join(op_str(k) + v for k, v in items.items()) + b"u"


def write_archive(path, pickled, storages=(), prefix="arch", byteorder=None):
    """A torch.save-style zip: <prefix>/data.pkl, <prefix>/data/<key> entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", b"\x80\x02" + pickled + b".")
        for key, data in storages:
            z.writestr(f"{prefix}/data/{key}", data)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        z.writestr(f"{prefix}/version", b"3\n")


MAGIC = 0x1950a86a20f9469cfc6c  # torch's legacy format: its first pickle


def write_legacy(path, pickled, storages=(), keys=None, magic=MAGIC, version=1001,
                 little_endian=True):
    """A legacy torch.save stream: pickles of the magic number, the protocol
    version, sys_info, the object (`pickled`, its opcodes) and the storage
    keys, then each storage of `storages` ((key, element count, bytes)) in
    that order: the count as int64, then the bytes."""
    sys_info = {"protocol_version": version, "little_endian": little_endian,
                "type_sizes": {"short": 2, "int": 4, "long": 8}}
    with open(path, "wb") as f:
        for obj in (magic, version, sys_info):
            pickle.dump(obj, f, protocol=2)
        f.write(b"\x80\x02" + pickled + b".")
        pickle.dump([k for k, _, _ in storages] if keys is None else keys, f, protocol=2)
        for _, count, data in storages:
            f.write(struct.pack("<q", count) + data)


@unittest.skipIf(torch is None, TORCH_MISSING)
class LoadTest(unittest.TestCase):
    def setUp(self):
        from ztier.torch._load import StateDictError, StateDictFile
        self.File, self.Error = StateDictFile, StateDictError
        base = os.environ.get("ZTIER_TEST_TMPDIR")
        if base:
            os.makedirs(base, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="ztier_load_", dir=base)
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def save(self, obj, name="sd.pt", **kw):
        path = os.path.join(self.dir, name)
        torch.save(obj, path, **kw)
        return path

    def open(self, path, **kw):
        f = self.File(path, **kw)
        self.addCleanup(f.close)
        return f

    def assertSameAsLoad(self, path, **kw):
        ref = torch.load(path)
        if "key" in kw:
            ref = ref[kw["key"]]
        with self.File(path, **kw) as f:
            self.assertEqual(f.names(), list(ref))
            self.assertEqual(len(f), len(ref))
            for name, t in f:
                with self.subTest(name=name):
                    want = (ref[name].shape, ref[name].dtype)
                    self.assertEqual((f.shape(name), f.dtype(name)), want)
                    self.assertEqual((t.shape, t.dtype), want)
                    self.assertTrue(torch.equal(bits(t), bits(ref[name])))
                    self.assertTrue(t.is_contiguous())

    # ------------------------------------------------------------- contents
    def test_every_dtype_bit_for_bit(self):
        sd = collections.OrderedDict()
        for i, name in enumerate(DTYPES):
            sd[f"{name}.w"] = random_tensor(getattr(torch, name), (5, 7), seed=i)
            sd[f"{name}.v"] = random_tensor(getattr(torch, name), (3,), seed=100 + i)
        sd["float32.special"] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")])
        self.assertSameAsLoad(self.save(sd))

    def test_module_state_dict_and_parameters(self):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        self.assertSameAsLoad(self.save(model.state_dict()))  # OrderedDict with _metadata
        params = dict(model.named_parameters())  # Parameters: _rebuild_parameter
        with self.open(self.save(params, "params.pt")) as f:
            self.assertTrue(f.read("0.weight").requires_grad)
            self.assertTrue(torch.equal(f.read("1.bias"), params["1.bias"].detach()))

    def test_views_shared_and_tied_storages(self):
        base = random_tensor(torch.float32, (6, 8), seed=1)
        tied = random_tensor(torch.float16, (4, 4), seed=2)
        sd = {"base": base, "transposed": base.t(), "block": base[2:5, 3:7],
              "every_other": base[:, ::2], "row": base[4], "element": base[5, 7],
              "expanded": base[1:2, :].expand(3, 8),  # stride 0
              "embed.weight": tied, "lm_head.weight": tied}  # one tensor saved twice
        path = self.save(sd)
        with zipfile.ZipFile(path) as z:  # two storages for all of these
            self.assertEqual(len([n for n in z.namelist() if "/data/" in n]), 2)
        self.assertSameAsLoad(path)

    def test_empty_and_zero_dim(self):
        sd = {"empty": torch.empty(0, 3), "empty_long": torch.zeros(0, dtype=torch.int64),
              "scalar": torch.tensor(2.5), "scalar_bool": torch.tensor(True),
              "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16)}
        self.assertSameAsLoad(self.save(sd))

    def test_read_into_out(self):
        w = random_tensor(torch.bfloat16, (3, 5), seed=3)
        f = self.open(self.save({"w": w, "wt": w.t()}))
        out = torch.zeros(5, 3, dtype=torch.bfloat16)
        self.assertIs(f.read("wt", out=out), out)
        self.assertTrue(torch.equal(bits(out), bits(w.t())))
        with self.assertRaisesRegex(self.Error, r"out is torch.float32 .*file has torch.bfloat16"):
            f.read("w", out=torch.zeros(3, 5))
        with self.assertRaisesRegex(self.Error, r"\(5, 3\).*\(3, 5\)"):
            f.read("w", out=torch.zeros(5, 3, dtype=torch.bfloat16))
        with self.assertRaises(KeyError):
            f.read("missing")

    def test_nested_key(self):
        model = torch.nn.Linear(3, 2)
        path = self.save({"model": model.state_dict(), "optimizer": {"state": {}, "groups": []},
                          "step": 7})
        self.assertSameAsLoad(path, key="model")
        with self.assertRaisesRegex(self.Error,
                                    r"not a flat mapping.*\['model', 'optimizer'\].*key="):
            self.File(path)
        with self.assertRaisesRegex(self.Error, r"no key 'ema'.*'model'"):
            self.File(path, key="ema")
        with self.assertRaisesRegex(self.Error, r"not a flat mapping"):
            self.File(path, key="optimizer")

    # ------------------------------------------------------- torch 2.x forms
    def test_torch2_records(self):
        data = random_tensor(torch.int32, (10,), seed=4)
        half = random_tensor(torch.float16, (2, 3), seed=5)
        pickled = op_dict(
            # dtypes newer than typed storages: byte storage, dtype argument
            v3=op_tensor("_rebuild_tensor_v3", "UntypedStorage", "0", 40, 1, (2, 3), (3, 1),
                         op_global("torch", "int32")),
            v3_meta=op_tensor("_rebuild_tensor_v3", "UntypedStorage", "0", 40, 0, (4,), (2,),
                              op_global("torch", "int32"), b"}"),
            v2_meta=op_tensor("_rebuild_tensor_v2", "HalfStorage", "1", 6, 0, (3, 2), (1, 3),
                              b"}"),
            param=op_global("torch._utils", "_rebuild_parameter_with_state") + op_tuple(
                op_tensor("_rebuild_tensor_v2", "HalfStorage", "1", 6, 0, (2, 3), (3, 1)),
                b"\x88", op_global("collections", "OrderedDict") + b")R", b"}") + b"R")
        storages = [("0", data.numpy().tobytes()), ("1", bits(half).numpy().tobytes())]
        path = os.path.join(self.dir, "torch2.pt")
        write_archive(path, pickled, storages, byteorder=b"little")
        f = self.open(path)
        self.assertTrue(torch.equal(f.read("v3"), data[1:7].view(2, 3)))
        self.assertTrue(torch.equal(f.read("v3_meta"), data[0:8:2]))
        self.assertTrue(torch.equal(bits(f.read("v2_meta")), bits(half.t())))
        self.assertTrue(torch.equal(bits(f.read("param")), bits(half)))
        self.assertTrue(f.read("param").requires_grad)

        conj = op_dict(c=op_tensor("_rebuild_tensor_v2", "HalfStorage", "1", 6, 0, (6,), (1,),
                                   b"}" + op_str("conj") + b"\x88s"))
        write_archive(path, conj, storages)
        with self.assertRaisesRegex(self.Error, r"metadata \{'conj': True\} is not supported"):
            self.File(path)
        write_archive(path, pickled, storages, byteorder=b"big")
        with self.assertRaisesRegex(self.Error, "big-endian"):
            self.File(path)

    # --------------------------------------------------------- legacy format
    def save_legacy(self, obj, name="legacy.pt"):
        path = self.save(obj, name, _use_new_zipfile_serialization=False)
        self.assertFalse(zipfile.is_zipfile(path))  # a bare pickle stream
        return path

    def test_legacy_contents(self):
        """torch.save(..., _use_new_zipfile_serialization=False): what the zip
        tests above read, from one legacy file each, equal to torch.load."""
        sd = collections.OrderedDict()
        for i, name in enumerate(DTYPES):  # every dtype: element sizes 1, 2, 4, 8
            sd[f"{name}.w"] = random_tensor(getattr(torch, name), (5, 7), seed=i)
            sd[f"{name}.v"] = random_tensor(getattr(torch, name), (3,), seed=100 + i)
        sd["float32.special"] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")])
        base = random_tensor(torch.float32, (6, 8), seed=1)
        tied = random_tensor(torch.float16, (4, 4), seed=2)
        sd.update({"base": base, "transposed": base.t(), "block": base[2:5, 3:7],
                   "every_other": base[:, ::2], "row": base[4], "element": base[5, 7],
                   "expanded": base[1:2, :].expand(3, 8),
                   "embed.weight": tied, "lm_head.weight": tied,
                   "empty": torch.empty(0, 3), "empty_long": torch.zeros(0, dtype=torch.int64),
                   "scalar": torch.tensor(2.5), "scalar_bool": torch.tensor(True),
                   "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16)})
        self.assertSameAsLoad(self.save_legacy(sd))

        # A module's state dict: BatchNorm's statistics and its int64
        # num_batches_tracked (counted: a forward in training mode), and a
        # weight tied to another module's (one storage, two names).
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
                                    torch.nn.ReLU(), torch.nn.Linear(4, 4))
        model[3].weight = model[0].weight
        model(torch.randn(8, 4))
        state = model.state_dict()
        self.assertEqual(state["1.num_batches_tracked"].dtype, torch.int64)
        self.assertEqual(int(state["1.num_batches_tracked"]), 1)
        path = self.save_legacy(state, "module.pt")
        self.assertSameAsLoad(path)
        f = self.open(path)
        self.assertEqual(f.read("1.num_batches_tracked").item(), 1)
        self.assertTrue(torch.equal(f.read("3.weight"), model[0].weight.detach()))

        # Parameters (requires_grad as saved), `out`, and a nested checkpoint.
        params = dict(model.named_parameters())
        f = self.open(self.save_legacy(params, "params.pt"))
        self.assertTrue(f.read("0.weight").requires_grad)
        out = torch.zeros(4, 4)
        self.assertIs(f.read("0.weight", out=out), out)
        self.assertTrue(torch.equal(out, model[0].weight.detach()))
        path = self.save_legacy({"model": state, "optimizer": {"state": {}}, "step": 7},
                                "nested.pt")
        self.assertSameAsLoad(path, key="model")
        with self.assertRaisesRegex(self.Error, r"not a flat mapping.*'model'.*key="):
            self.File(path)

    def test_legacy_storage_placement(self):
        """Storages lie in the key list's order, each an int64 count and
        count elements of its class's size, whatever order the records name
        them in; a view's offset and strides count elements."""
        half = random_tensor(torch.float16, (2, 3), seed=5)
        data = random_tensor(torch.float64, (10,), seed=6)
        flags = random_tensor(torch.bool, (5,), seed=7)
        none = b"N"
        pickled = op_dict(
            flags=op_tensor("_rebuild_tensor_v2", "BoolStorage", "k3", 5, 0, (5,), (1,), view=none),
            ht=op_tensor("_rebuild_tensor_v2", "HalfStorage", "k1", 6, 0, (3, 2), (1, 3),
                         view=none),
            odd=op_tensor("_rebuild_tensor_v2", "DoubleStorage", "k2", 10, 1, (3,), (3,),
                          view=none),
            param=op_global("torch._utils", "_rebuild_parameter") + op_tuple(
                op_tensor("_rebuild_tensor_v2", "HalfStorage", "k1", 6, 0, (2, 3), (3, 1),
                          view=none), b"\x88", op_global("collections", "OrderedDict") + b")R")
            + b"R")
        storages = [("k1", 6, bits(half).numpy().tobytes()),
                    ("k2", 10, data.numpy().tobytes()),
                    ("k3", 5, flags.numpy().tobytes())]
        path = os.path.join(self.dir, "legacy.pt")
        write_legacy(path, pickled, storages)
        f = self.open(path)
        self.assertTrue(torch.equal(f.read("flags"), flags))
        self.assertTrue(torch.equal(bits(f.read("ht")), bits(half.t())))
        self.assertTrue(torch.equal(f.read("odd"), data[1:8:3]))
        self.assertTrue(torch.equal(bits(f.read("param")), bits(half)))
        self.assertTrue(f.read("param").requires_grad)
        self.assertSameAsLoad(path)  # torch.load reads the same layout

    def test_legacy_errors(self):
        w = op_tensor("_rebuild_tensor_v2", "FloatStorage", "0", 4, 0, (4,), (1,), view=b"N")
        good = [("0", 4, b"\0" * 16)]
        path = os.path.join(self.dir, "legacy.pt")

        def refused(regex, pickled=op_dict(w=w), storages=good, read=False, **kw):
            """Opening the stream fails saying `regex`; or (read) reading w."""
            write_legacy(path, pickled, storages, **kw)
            with self.assertRaisesRegex(self.Error, regex):
                with self.File(path) as f:
                    if read:
                        f.read("w")

        refused("without torch's magic number", magic=12345)
        refused(r"protocol version 1000 is not supported", version=1000)
        refused("big-endian", little_endian=False)
        refused(r"storage '0' is a view of another",
                op_dict(w=op_tensor("_rebuild_tensor_v2", "FloatStorage", "0", 4, 0, (2,), (1,),
                                    view=op_tuple(op_str("1"), op_int(0), op_int(2)))))
        refused(r"unsupported persistent id", op_dict(w=op_tensor(
            "_rebuild_tensor_v2", "FloatStorage", "0", 4, 0, (4,), (1,))))  # a zip-format id
        refused(r"the storage list names 'x' which no tensor uses", keys=["0", "x"])
        refused(r"the storage list names '0' twice", keys=["0", "0"])
        refused(r"truncated: its storages end at byte \d+, the file has",
                storages=[("0", 4, b"\0" * 15)])
        refused(r"storage '0': the file gives 5 elements, its record 4: damaged",
                storages=[("0", 5, b"\0" * 16)], read=True)
        refused(r"storage '0' is missing.*or smaller than the tensor", op_dict(
            w=op_tensor("_rebuild_tensor_v2", "FloatStorage", "0", 4, 1, (4,), (1,), view=b"N")),
            read=True)  # spans past the storage's end
        # A torch-written file cut short: in its storages, then in its pickles.
        path = self.save_legacy({"w": torch.ones(1000), "v": torch.ones(10)})
        with open(path, "rb") as f:
            whole = f.read()
        for cut, regex in ((len(whole) - 100, "truncated: its storages end"),
                           (60, "cannot read the legacy format's pickles")):
            with open(path, "wb") as f:
                f.write(whole[:cut])
            with self.subTest(cut=cut), self.assertRaisesRegex(self.Error, regex):
                self.File(path)

    # ----------------------------------------------------------------- errors
    def test_truncated_and_not_a_zip(self):
        path = self.save({"w": torch.ones(1000)})
        with open(path, "rb") as f:
            head = f.read(os.path.getsize(path) // 2)
        for cut in (len(head), 100, 4):
            with open(path, "wb") as f:
                f.write(head[:cut])
            with self.subTest(cut=cut):
                with self.assertRaisesRegex(self.Error, "truncated or corrupt zip"):
                    self.File(path)
        with open(path, "w") as f:
            f.write("hello")
        with self.assertRaisesRegex(self.Error, "not a zip archive nor a legacy torch.save"):
            self.File(path)
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("other.txt", "x")
        with self.assertRaisesRegex(self.Error, "no <prefix>/data.pkl"):
            self.File(path)

    def test_truncated_storage_entry(self):
        path = os.path.join(self.dir, "short.pt")
        write_archive(path, op_dict(w=op_tensor("_rebuild_tensor_v2", "FloatStorage", "0", 8, 0,
                                                (8,), (1,))), [("0", b"\0" * 16)])
        with self.assertRaisesRegex(self.Error, "smaller than the tensor"):
            self.open(path).read("w")

    def test_foreign_global_refused_and_not_run(self):
        marker = os.path.join(self.dir, "ran")

        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        # os.system at the top; eval as the argument of an allowed rebuild function
        evil_arg = op_global("builtins", "eval") + op_tuple(op_str("1")) + b"R"
        cases = {"os.system": pickle.dumps({"w": Evil()}, protocol=2)[2:-1],
                 "tensor arg": op_dict(w=op_global("torch._utils", "_rebuild_parameter")
                                       + op_tuple(evil_arg, b"\x89", b"}") + b"R")}
        refused = {"os.system": r"references (posix|nt|os)\.system.*refused",
                   "tensor arg": r"references builtins\.eval.*refused"}
        for case, pickled in cases.items():
            path = os.path.join(self.dir, "evil.pt")
            for write in (write_archive, write_legacy):  # data.pkl, or the legacy stream's
                write(path, pickled)
                with self.subTest(case=case, format=write.__name__), \
                        self.assertRaisesRegex(self.Error, refused[case]):
                    self.File(path)
        path = self.save({"w": Evil()}, "evil_legacy.pt", _use_new_zipfile_serialization=False)
        with self.assertRaisesRegex(self.Error, refused["os.system"]):
            self.File(path)
        self.assertFalse(os.path.exists(marker))

    # ----------------------------------------------------------------- memory
    def test_streaming_memory(self):
        """~200 MB in 50 tensors of 4 MB: reading them one at a time grows
        peak RSS by well under the file's size; torch.load grows it by all.
        The same file in the legacy format streams within the same bound."""
        count, numel = 50, 1 << 20
        sd = {f"layer{i}.weight": torch.full((numel,), float(i)) for i in range(count)}
        path = self.save(sd)
        legacy = self.save(sd, "legacy.pt", _use_new_zipfile_serialization=False)
        del sd
        size = os.path.getsize(path)
        self.assertGreater(size, 200e6)
        script = f"""
import sys, torch
from ztier.torch._load import StateDictFile
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
torch.full((1024,), 1.0).sum()
try:  # resets VmHWM (Linux >= 4.0); else the baseline below overstates growth
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS:")
if sys.argv[1] == "stream":
    with StateDictFile(sys.argv[2]) as f:
        for i, (name, t) in enumerate(f):
            assert name == f"layer{{i}}.weight" and t.numel() == {numel}
            assert t[0] == i and t[-1] == i
        assert i == {count} - 1
else:
    sd = torch.load(sys.argv[2])
    assert len(sd) == {count}
print(status("VmHWM:") - base)
"""
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
        growth = {}
        for mode, file in (("stream", path), ("torch.load", path), ("stream", legacy)):
            out = subprocess.run([sys.executable, "-c", script, mode, file], env=env, check=True,
                                 capture_output=True, text=True).stdout
            growth[f"{mode} {os.path.basename(file)}"] = int(out.split()[-1])
        self.assertGreater(growth["torch.load sd.pt"], 0.9 * size, growth)  # the measure works
        self.assertLess(growth["stream sd.pt"], 0.4 * size, growth)
        self.assertLess(growth["stream legacy.pt"], 0.4 * size, growth)


@unittest.skipIf(torch is None, TORCH_MISSING)
class ExportRoundTripTest(unittest.TestCase):
    """ztier.checkpoint_export writes torch's legacy format; offload(weights=)
    reads it back as it is, no re-save."""

    class Scaled(torch.nn.Module if torch is not None else object):
        """A network and a 0-d parameter (as CLIP's logit_scale)."""

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16),
                                           torch.nn.GELU(), torch.nn.Linear(16, 16),
                                           torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
            self.scale = torch.nn.Parameter(torch.ones([]))

        def forward(self, x):
            return self.net(x) * self.scale

    @classmethod
    def build(cls):
        return cls.Scaled()

    def test_export_back_through_weights(self):
        import ztier
        import ztier.torch
        from ztier.torch._load import StateDictFile
        path = tmpdir(self, "ztier_load_")
        ckpt, out = os.path.join(path, "ckpt"), os.path.join(path, "model.pt")

        def config(model, name):
            # The defaults: the whole model in one optimizer sub-group, so the
            # optimizer has one state buffer (the save once waited for two).
            return ztier.torch.model_config(model, os.path.join(path, name))

        torch.manual_seed(0)
        model = self.build()
        off = ztier.torch.offload(model, config(model, "a"))
        opt = off.adamw(lr=1e-2)
        for _ in range(2):  # trained: the weights are not any initialisation
            model(torch.randn(8, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        off.save_checkpoint(ckpt, opt)
        weights = off.full_parameters()
        off.close()
        ztier.checkpoint_export(ckpt, out)
        self.assertFalse(zipfile.is_zipfile(out))  # the legacy format
        exported = torch.load(out)
        self.assertEqual(list(exported), list(weights))
        with StateDictFile(out) as f:  # streamed, equal to torch.load
            self.assertEqual(f.names(), list(exported))
            for name, t in f:
                self.assertEqual(t.dtype, torch.float32, name)
                self.assertTrue(torch.equal(t, exported[name]), name)
                self.assertTrue(torch.equal(t, weights[name]), name)
        self.assertEqual(exported["scale"].shape, torch.Size([]))  # 0-d stays 0-d
        plain = self.build()  # and the plain model takes the export as it is
        missing, unexpected = plain.load_state_dict(exported, strict=False)
        self.assertEqual(unexpected, [])
        self.assertTrue(all("running" in k or "num_batches" in k for k in missing), missing)
        self.assertTrue(torch.equal(plain.scale.detach(), weights["scale"]))

        # A fresh model, parameters on the meta device, built from the export.
        for dtype in (None, torch.bfloat16):
            with self.subTest(dtype=dtype):
                with ztier.torch.meta_init():
                    model = self.build()
                off = ztier.torch.offload(model, config(model, f"b{dtype}"), weights=out,
                                          **({} if dtype is None else {"dtype": dtype}))
                back = off.full_parameters()
                off.close()
                self.assertEqual(list(back), list(exported))
                for name, t in exported.items():
                    want = t if dtype is None else t.to(dtype)  # converted on the way in
                    self.assertTrue(torch.equal(back[name], want), name)


if __name__ == "__main__":
    unittest.main()
