"""The ctypes binding of the C API: version, errors as ZtierError with status
and message, the full hook cycle and partition access on bytes buffers,
misuse. Needs no torch."""

import array
import os
import shutil
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "python"))

import ztier  # noqa: E402
from ztier import DType, Status, ZtierError  # noqa: E402


def config_text(path):
    return ("tiers:\n  params: nvme\n  host: {pin_memory: false}\n"
            f"  nvme: {{paths: [\"{path}\"], buffer_count: 4, buffer_size: 4096,\n"
            "         buffer_element_bytes: 4}\n"
            "coordinator: {param_persistence_threshold: 0}\n"
            "io: {register_buffers: false}\n")


class BindingTest(unittest.TestCase):
    def setUp(self):
        base = os.environ.get("ZTIER_TEST_TMPDIR") or os.getcwd()
        os.makedirs(base, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="ztier_py_", dir=base)
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def test_version(self):
        self.assertEqual(ztier.version(), (0, 2, 0))
        self.assertEqual(ztier.version_string(), "0.2.0")
        self.assertEqual(ztier.status_string(Status.NOT_FOUND), "ZTIER_STATUS_NOT_FOUND")

    def test_bad_config_raises(self):
        with self.assertRaises(ZtierError) as cm:
            ztier.Engine(config_text="tiers: {nvme: {buffer_cont: 4}}\n")
        self.assertEqual(cm.exception.status, Status.INVALID_ARGUMENT)
        self.assertIn("buffer_count", cm.exception.message)

    def test_cycle_and_misuse(self):
        e = ztier.Engine(config_text=config_text(self.dir), device="host")
        handle = e._handle.value
        with e:
            w = array.array("f", [float(i) for i in range(100)])
            e.register_param(0, 100, DType.FLOAT32, w)
            e.register_module(0, "m", [0])
            with self.assertRaises(ZtierError) as cm:
                e.fetch(5)
            self.assertEqual(cm.exception.status, Status.NOT_FOUND)
            with self.assertRaises(ZtierError) as cm:
                e.release(0)
            self.assertEqual(cm.exception.status, Status.FAILED_PRECONDITION)
            e.fetch(0)
            ptr = e.param_data(0)
            self.assertEqual(bytes((ztier._capi.ctypes.c_char * 400).from_address(ptr)),
                             w.tobytes())
            e.release(0)
            with self.assertRaises(ZtierError) as cm:
                e.param_data(0)
            self.assertEqual(cm.exception.status, Status.FAILED_PRECONDITION)
            e.grad_reduce(0, array.array("f", [1.0] * 100))
            g = array.array("f", [0.0] * 100)
            e.grad_partition_read(0, g)
            self.assertEqual(list(g), [1.0] * 100)
            out = bytearray(400)
            e.partition_read(0, out)
            self.assertEqual(bytes(out), w.tobytes())
            with self.assertRaises(ZtierError) as cm:
                e.partition_read(0, bytearray(12))
            self.assertEqual(cm.exception.status, Status.INVALID_ARGUMENT)
            e.step_end()
            info = e.param_info(0)
            self.assertEqual((info.numel, info.partition_numel, info.has_grad), (100, 100, True))
            self.assertIsNone(e.async_error())
            self.assertEqual(e.stats()["steps"], 1)
        # Double destroy: the stale handle is refused, not followed.
        self.assertEqual(e._lib.ztier_engine_destroy(handle), Status.INVALID_HANDLE)
        self.assertIn("not a live engine", e._lib.ztier_last_error().decode())
        self.assertEqual(e._lib.ztier_engine_destroy(None), Status.OK)

    def test_optimizer(self):
        from ztier import OptimizerKind, StateArray
        e = ztier.Engine(config_text=config_text(self.dir) + "optimizer: {sub_group_size: 64}\n",
                         device="host")
        with e:
            w = array.array("f", [0.5] * 100)
            e.register_param(0, 100, DType.FLOAT32, w)
            with self.assertRaises(ZtierError) as cm:
                e.optimizer_step()
            self.assertEqual(cm.exception.status, Status.FAILED_PRECONDITION)
            with self.assertRaises(ZtierError) as cm:
                e.optimizer_create(OptimizerKind.ADAMW, lr=-1.0)
            self.assertEqual(cm.exception.status, Status.INVALID_ARGUMENT)
            self.assertIn("lr", cm.exception.message)
            self.assertEqual(e.exchange_u64(7), [7])  # one rank: its own value
            e.optimizer_create(OptimizerKind.ADAMW, lr=0.1, weight_decay=0.0)
            e.grad_partition_write(0, array.array("f", [2.0] * 100))
            e.optimizer_step()
            # Step 1 from zero moments moves each weight by lr against the gradient.
            out = array.array("f", [0.0] * 100)
            e.partition_read(0, out)
            for v in out:
                self.assertAlmostEqual(v, 0.4, places=5)
            master = array.array("f", [0.0] * 100)
            e.optimizer_state_read(0, StateArray.MASTER, master)
            self.assertEqual(master.tobytes(), out.tobytes())
            m = array.array("f", [0.0] * 100)
            e.optimizer_state_read(0, StateArray.EXP_AVG, m)
            self.assertEqual(list(m), [array.array("f", [0.1 * 2.0])[0]] * 100)
            stats = e.optimizer_stats()
            self.assertEqual((stats["step"], stats["sub_groups"], stats["elements"]), (1, 2, 100))
            with self.assertRaises(ZtierError) as cm:
                e.optimizer_step(OptimizerKind.ADAM, lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0, bias_correction=True)
            self.assertEqual(cm.exception.status, Status.INVALID_ARGUMENT)

    def test_optimizer_groups_and_a_step_begun_during_backward(self):
        # Two engines with the same parameters and gradients: one steps
        # plainly, the other begins the step before its gradients exist,
        # gets them one by one, and finishes: the same partitions and state.
        # A cancelled begin leaves the state as it was; a second gradient for
        # a parameter the begun step took voids it (the finish runs whole).
        from ztier import OptimizerKind, StateArray
        groups = [dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                       bias_correction=True),
                  dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                       bias_correction=True)]
        sizes = [100, 37, 250]
        grads = [array.array("f", [0.25 * (k + 1) + 0.001 * i for i in range(n)])
                 for k, n in enumerate(sizes)]

        def engine(sub):
            path = os.path.join(self.dir, sub)
            os.makedirs(path)
            e = ztier.Engine(config_text=config_text(path) + "optimizer: {sub_group_size: 64}\n",
                             device="host")
            for k, n in enumerate(sizes):
                e.register_param(k, n, DType.FLOAT32, array.array("f", [0.5 + k] * n))
            e.optimizer_create_groups(OptimizerKind.ADAMW, groups, {0: 0, 1: 1, 2: 0})
            return e

        def state(e):
            out = []
            for k, n in enumerate(sizes):
                for arr in (StateArray.MASTER, StateArray.EXP_AVG, StateArray.EXP_AVG_SQ):
                    buf = array.array("f", [0.0] * n)
                    e.optimizer_state_read(k, arr, buf)
                    out.append(buf.tobytes())
            return out

        with engine("plain") as plain, engine("early") as early:
            for k in range(3):
                plain.grad_partition_write(k, grads[k])
            plain.optimizer_step_groups(OptimizerKind.ADAMW, groups)
            before = state(early)
            early.optimizer_step_begin(OptimizerKind.ADAMW, groups)
            with self.assertRaises(ZtierError) as cm:
                early.optimizer_state_read(0, StateArray.MASTER, array.array("f", [0.0] * 100))
            self.assertEqual(cm.exception.status, Status.FAILED_PRECONDITION)
            early.optimizer_step_cancel()
            self.assertEqual(state(early), before)
            # Voided: a gradient handed in twice; the finish runs the step whole.
            early.optimizer_step_begin(OptimizerKind.ADAMW, groups)
            for k in reversed(range(3)):
                early.grad_partition_write(k, grads[k])
            early.grad_partition_write(1, grads[1])
            early.optimizer_step_finish(OptimizerKind.ADAMW, groups)
            self.assertEqual(state(early), state(plain))
            # Begun and finished with every gradient once: the begun work is used.
            with engine("early2") as again:
                again.optimizer_step_begin(OptimizerKind.ADAMW, groups)
                for k in reversed(range(3)):
                    again.grad_partition_write(k, grads[k])
                again.optimizer_step_finish(OptimizerKind.ADAMW, groups)
                self.assertEqual(state(again), state(plain))
                self.assertEqual(again.optimizer_stats()["step"], 1)
                for k, n in enumerate(sizes):
                    a, b = array.array("f", [0.0] * n), array.array("f", [0.0] * n)
                    again.partition_read(k, a)
                    plain.partition_read(k, b)
                    self.assertEqual(a.tobytes(), b.tobytes())
                with self.assertRaises(ZtierError) as cm:  # one set per group
                    again.optimizer_step_begin(OptimizerKind.ADAMW, groups[:1])
                self.assertEqual(cm.exception.status, Status.INVALID_ARGUMENT)

    # ---- gloo: ranks as processes; here two threads, each its own engine
    def gloo_ranks(self, make_kwargs, world=2):
        """Runs a fetch / release / exchange on `world` gloo ranks (threads);
        returns what each saw, or raises the first rank's error."""
        import threading
        out, errors = [None] * world, []

        def rank_main(rank):
            try:
                with ztier.Engine(config_text=config_text(os.path.join(self.dir, str(rank))),
                                  rank=rank, world_size=world, device="host",
                                  **make_kwargs(rank)) as e:
                    w = array.array("f", [float(i) for i in range(100)])
                    e.register_param(0, 100, DType.FLOAT32, w)
                    e.register_module(0, "m", [0])
                    e.fetch(0)
                    full = bytes((ztier._capi.ctypes.c_char * 400).from_address(e.param_data(0)))
                    e.release(0)
                    out[rank] = (full == w.tobytes(), e.exchange_u64(10 + rank), e.describe())
            except BaseException as err:
                errors.append(err)
        for k in range(world):
            os.makedirs(os.path.join(self.dir, str(k)), exist_ok=True)
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            if isinstance(errors[0], ZtierError) and "gloo" in errors[0].message and \
                    errors[0].status == Status.UNAVAILABLE:
                self.skipTest(f"libztier without gloo: {errors[0].message}")
            raise errors[0]
        return out

    def test_gloo_store_path_and_python_store(self):
        store_dir = os.path.join(self.dir, "store")
        os.makedirs(store_dir)
        for how, kwargs in (("path", lambda r: dict(gloo_store_path=store_dir)),
                            ("store", lambda r: dict(gloo_store=shared, gloo_prefix="t"))):
            with self.subTest(how):
                shared = _DictStore()
                out = self.gloo_ranks(kwargs)
                for rank, (same, exchanged, described) in enumerate(out):
                    self.assertTrue(same)
                    self.assertEqual(exchanged, [10, 11])
                    self.assertIn(f"rank {rank}/2", described)
                if how == "store":
                    self.assertTrue(shared.keys, "the store was not used")
                    self.assertTrue(all(k.startswith("t/") for k in shared.keys), shared.keys)

    def test_gloo_store_errors_reach_the_caller(self):
        class Broken(_DictStore):
            def get(self, key):
                raise ValueError("no such table")
        with self.assertRaises(ZtierError) as cm:
            ztier.Engine(config_text=config_text(self.dir), rank=0, world_size=2,
                         device="host", gloo_store=Broken())
        if cm.exception.status == Status.UNAVAILABLE and "gloo" in cm.exception.message:
            self.skipTest(f"libztier without gloo: {cm.exception.message}")
        self.assertIn("no such table", str(cm.exception))
        with self.assertRaises(TypeError):
            ztier.Engine(config_text=config_text(self.dir), rank=0, world_size=2,
                         gloo_store=object())
        with self.assertRaises(ValueError):
            ztier.Engine(config_text=config_text(self.dir), rank=0, world_size=2,
                         gloo_store=_DictStore(), gloo_store_path=self.dir)


class _DictStore:
    """A key-value store shared by threads: get blocks until the key is set
    (a TimeoutError after 30 s), as torch.distributed.Store's."""

    def __init__(self):
        import threading
        self._cv = threading.Condition()
        self._data = {}
        self.keys = []

    def set(self, key, value):
        with self._cv:
            self._data[key] = bytes(value)
            self.keys.append(key)
            self._cv.notify_all()

    def get(self, key):
        with self._cv:
            if not self._cv.wait_for(lambda: key in self._data, timeout=30):
                raise TimeoutError(f"{key} not set within 30 s")
            return self._data[key]


if __name__ == "__main__":
    unittest.main()
