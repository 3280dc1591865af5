"""ztier.torch over torch.distributed: ranks as real processes (the gloo
collective), set up as torchrun does (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, init_process_group("gloo")); ztier takes rank, world size and
the store from the process group, and rank 0's initial parameters (the
other ranks start from other values: the broadcast fixes them).

  - the tiny GPT at 2 and 4 processes, each on its shard of the batch: the
    mean over ranks of the per-rank losses within 1e-5 (relative) of the
    single-process full-batch loop, and every rank's parameter partitions
    and ztier AdamW state (master, both moments) bit-identical to the same
    world size as threads (ztier.LocalGroup);
  - model-zoo cases (nn.TransformerEncoder, nn.MultiheadAttention with
    kdim/vdim) at 2 processes, within 1e-5 of the full batch (the second
    with a store passed to offload(): a FileStore);
  - a rank killed (SIGKILL) after step 1: the others fail at once with an
    error naming rank 1, well within comm.timeout (30 s), and close;
  - a rank stopped (SIGSTOP) after step 1: the other fails after
    comm.timeout (5 s), naming it;
  - rank 1 running its modules in another order on step 2: every rank fails
    with a ztier error, none hangs;
  - rank 1 running its blocks in another order from the first step, where
    every gather still has the same size on both ranks: the step end's
    trace comparison fails every rank, naming the ranks that differ.

Every process runs this file (`worker` mode) under a timeout. Skips, saying
why, without torch or torch.distributed.
"""

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from torch_testing import TORCH_MISSING, run_ranks, tmpdir, torch, training_config  # noqa: E402

STEPS = 5
LR = dict(lr=1e-2, weight_decay=0.1)
WORKER_TIMEOUT_S = 120  # nothing hangs: a worker past it is killed, the test fails
DIST_MISSING = ""
if torch is not None:
    import torch.distributed as dist
    if not dist.is_available():
        DIST_MISSING = "torch.distributed is not available in this torch build"


# ---------------------------------------------------------------- shared
def snapshot(off, opt, model):
    """This rank's parameter partitions and ztier AdamW state, by name."""
    out = {}
    for name, p in model.named_parameters():
        slot = off.slot_of(p)
        info = off.engine.param_info(slot.pid)
        part = torch.empty(info.partition_numel, dtype=slot.dtype)
        off.engine.partition_read(slot.pid, part)
        out[name] = dict(partition=part, **opt.state_of(p))
    return out


def gpt_init(seed=0):
    import tiny_gpt
    torch.manual_seed(seed)
    return tiny_gpt.TinyGPT()


def shard(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


class OrderedGPT(torch.nn.Module if torch is not None else object):
    """The tiny GPT whose blocks run in reverse order when `reverse` is set."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.reverse = False

    def forward(self, idx):
        g = self.gpt
        x = g.wte(idx) + g.wpe(torch.arange(idx.shape[1]))
        for block in (reversed(g.blocks) if self.reverse else g.blocks):
            x = block(x)
        return g.head(g.ln_f(x))


def zoo_case(name):
    """(build, loss_of(model, x), data): nn.TransformerEncoder and a
    nn.MultiheadAttention model (kdim/vdim; it reads out_proj's weight)."""
    from torch import nn
    g = torch.Generator().manual_seed(3)
    if name == "encoder":
        def build():
            return nn.TransformerEncoder(nn.TransformerEncoderLayer(
                16, 2, dim_feedforward=32, dropout=0.0, batch_first=True), num_layers=2)
        data = [torch.randn(4, 6, 16, generator=g) for _ in range(3)]
        return build, lambda m, x: m(x).pow(2).mean(), data

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 16)
            self.kv = nn.Linear(8, 6)
            self.attn = nn.MultiheadAttention(16, 4, kdim=6, vdim=6, batch_first=True)

        def forward(self, x):
            kv = self.kv(x)
            out, _ = self.attn(self.q(x), kv, kv, need_weights=False)
            return out
    data = [torch.randn(4, 5, 8, generator=g) for _ in range(3)]
    return Attn, lambda m, x: m(x).pow(2).mean(), data


# ---------------------------------------------------------------- worker
def worker(case, out_dir, path):
    """One rank (a process): RANK/WORLD_SIZE/MASTER_* from the environment."""
    import tiny_gpt
    import ztier.torch
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if case == "nostore":  # a process group made without torchrun's variables
        addr = os.environ.pop("MASTER_ADDR")
        port = int(os.environ.pop("MASTER_PORT"))
        dist.init_process_group("gloo", store=dist.TCPStore(addr, port, world, rank == 0),
                                rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo")
    result = dict(rank=rank, losses=[])
    try:
        if case == "nostore":
            model = gpt_init(seed=0)
            try:
                ztier.torch.offload(model, training_config(path))
            except RuntimeError as e:
                result["no_store_error"] = str(e)
            # Explicit rank and world size with a store: ranks as processes
            # without the process group (no broadcast: identical weights).
            store = dist.FileStore(os.path.join(out_dir, "store"), world)
            off = ztier.torch.offload(model, training_config(path), rank=rank,
                                      world_size=world, store=store)
            opt = off.adamw(**LR)
            for x, y in tiny_gpt.batches(2):
                loss = tiny_gpt.loss_of(model, shard(x, rank, world), shard(y, rank, world))
                loss.backward()
                opt.step()
                opt.zero_grad()
                result["losses"].append(loss.item())
            result["world"] = (off.rank, off.world_size)
            off.close()
        elif case == "gpt":
            model = gpt_init(seed=0 if rank == 0 else 100 + rank)  # the broadcast fixes it
            off = ztier.torch.offload(model, training_config(path))
            result["world"] = (off.rank, off.world_size)
            opt = off.adamw(**LR)
            for x, y in tiny_gpt.batches(STEPS):
                loss = tiny_gpt.loss_of(model, shard(x, rank, world), shard(y, rank, world))
                loss.backward()
                opt.step()
                opt.zero_grad()
                result["losses"].append(loss.item())
            result["snapshot"] = snapshot(off, opt, model)
            off.close()
        elif case.startswith("zoo-"):
            from test_torch_models import config_for
            build, loss_of, data = zoo_case(case[4:])
            torch.manual_seed(0 if rank == 0 else 100 + rank)
            model = build()
            # The attn case passes a store of its own (the others: torchrun's).
            store = dist.FileStore(os.path.join(out_dir, "store"), world) \
                if case == "zoo-attn" else None
            off = ztier.torch.offload(model, config_for(model, path), store=store)
            opt = off.adamw(lr=1e-3)
            for x in data:
                loss = loss_of(model, shard(x, rank, world))
                loss.backward()
                opt.step()
                opt.zero_grad()
                result["losses"].append(loss.item())
            off.close()
        elif case in ("kill", "hang", "mismatch", "trace"):
            model = OrderedGPT(gpt_init(seed=0))
            timeout = 5 if case == "hang" else 30
            off = worker.off = ztier.torch.offload(model, training_config(path).replace(
                "io: {", f"comm: {{backend: gloo, timeout: {timeout}}}\nio: {{"))
            opt = off.adamw(**LR)
            for step, (x, y) in enumerate(tiny_gpt.batches(4)):
                if case == "kill" and step == 2 and rank == 1:
                    with open(os.path.join(out_dir, "killed_at"), "w") as f:
                        f.write(repr(time.time()))
                    os.kill(os.getpid(), signal.SIGKILL)
                if case == "hang" and step == 2 and rank == 1:
                    with open(os.path.join(out_dir, "killed_at"), "w") as f:
                        f.write(repr(time.time()))
                    os.kill(os.getpid(), signal.SIGSTOP)  # alive, silent: the test kills it
                model.reverse = rank == 1 and ((case == "mismatch" and step == 2) or
                                               case == "trace")
                loss = tiny_gpt.loss_of(model, shard(x, rank, world), shard(y, rank, world))
                loss.backward()
                opt.step()
                opt.zero_grad()
                result["losses"].append(loss.item())
            off.close()
    except Exception as e:  # reported through the result file and stderr
        result["error"] = f"{type(e).__name__}: {e}"
        result["error_at"] = time.time()
        result["ztier_error"] = isinstance(e, ztier.ZtierError)
        print(f"rank {rank}: {result['error']}", file=sys.stderr, flush=True)
        # What a trainer does next: destroy the engine (it must not wait for
        # the lost rank), then exit.
        off = getattr(worker, "off", None)
        if off is not None:
            try:
                off.close()
            except Exception as e2:
                result["close_error"] = f"{type(e2).__name__}: {e2}"
            result["closed_in"] = time.time() - result["error_at"]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    sys.stderr.flush()
    # No teardown that could wait for a lost peer (the process group's).
    os._exit(0)


# ---------------------------------------------------------------- tests
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@unittest.skipIf(torch is None or DIST_MISSING, TORCH_MISSING or DIST_MISSING)
class DistTest(unittest.TestCase):
    def spawn(self, case, world, stopped=None):
        """Runs `world` worker processes; returns (per-rank results or None,
        per-rank (returncode, stderr), seconds). Rank `stopped`, if any,
        is waited for last and killed then."""
        out = tmpdir(self, "ztier_dist_")
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   WORLD_SIZE=str(world), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        root = os.path.dirname(os.path.dirname(HERE))
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(root, "python"), HERE] + ([env["PYTHONPATH"]] if "PYTHONPATH" in env else []))
        start = time.time()
        procs = []
        for rank in range(world):
            env["RANK"] = str(rank)
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "worker", case, out,
                 os.path.join(out, "nvme")], env=dict(env), cwd=HERE,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        procs_out = [None] * world
        for rank in sorted(range(world), key=lambda r: r == stopped):
            p = procs[rank]
            if rank == stopped:  # the others are done: it never will be
                p.kill()
            try:
                _, err = p.communicate(timeout=max(1, WORKER_TIMEOUT_S - (time.time() - start)))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                err += "\n(killed: past the worker timeout)"
            procs_out[rank] = (p.returncode, err)
        seconds = time.time() - start
        results = []
        for rank in range(world):
            f = os.path.join(out, f"rank{rank}.pt")
            results.append(torch.load(f) if os.path.exists(f) else None)
        killed_at = os.path.join(out, "killed_at")
        if os.path.exists(killed_at):
            with open(killed_at) as f:
                self.killed_at = float(f.read())
        return results, procs_out, seconds

    def assertAllRan(self, results, procs_out):
        for rank, (r, (code, err)) in enumerate(zip(results, procs_out)):
            self.assertEqual(code, 0, f"rank {rank}: {err[-3000:]}")
            self.assertIsNotNone(r, f"rank {rank} left no result: {err[-3000:]}")
            self.assertNotIn("error", r, f"rank {rank}: {r.get('error')}")

    def assertAllFailed(self, results, procs_out):
        """Every rank exited by itself, leaving a result with a ztier error."""
        for rank, (r, (code, err)) in enumerate(zip(results, procs_out)):
            self.assertEqual(code, 0, f"rank {rank}: {err[-3000:]}")
            self.assertIsNotNone(r, f"rank {rank} left no result: {err[-3000:]}")
            self.assertIn("error", r, f"rank {rank} did not fail")
            self.assertTrue(r["ztier_error"], r["error"])

    # ---- the tiny GPT
    @classmethod
    def setUpClass(cls):
        import tiny_gpt
        cls.tiny_gpt = tiny_gpt
        model = gpt_init(0)
        cls.init = copy.deepcopy(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), **LR)
        cls.ref_losses = []
        for x, y in tiny_gpt.batches(STEPS):
            loss = tiny_gpt.loss_of(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            cls.ref_losses.append(loss.item())

    def threads(self, world):
        """The same training as `world` threads (LocalGroup): each rank's snapshot."""
        import ztier.torch
        path = tmpdir(self)
        snaps = [None] * world

        def rank_main(rank, group):
            model = self.tiny_gpt.TinyGPT()  # torch's RNG is shared by the threads:
            model.load_state_dict(self.init)  # the initial values come from one draw
            off = ztier.torch.offload(model, training_config(path), rank=rank,
                                      world_size=world, local_group=group)
            opt = off.adamw(**LR)
            for x, y in self.tiny_gpt.batches(STEPS):
                loss = self.tiny_gpt.loss_of(model, shard(x, rank, world),
                                             shard(y, rank, world))
                loss.backward()
                opt.step()
                opt.zero_grad()
            snaps[rank] = snapshot(off, opt, model)
            off.close()
        run_ranks(world, rank_main)
        return snaps

    def check_gpt(self, world):
        results, procs_out, seconds = self.spawn("gpt", world)
        self.assertAllRan(results, procs_out)
        for rank, r in enumerate(results):
            self.assertEqual(r["world"], (rank, world))
        mean = [sum(r["losses"][s] for r in results) / world for s in range(STEPS)]
        print(f"\n{world} processes ({seconds:.1f} s): reference full batch, mean of ranks, "
              "relative diff")
        for step, (a, b) in enumerate(zip(self.ref_losses, mean)):
            print(f"  step {step}  {a:.9f}  {b:.9f}  {abs(a - b) / abs(a):.2e}")
        for step, (a, b) in enumerate(zip(self.ref_losses, mean)):
            self.assertLessEqual(abs(a - b), 1e-5 * abs(a), f"step {step}")
        snaps = self.threads(world)
        compared = 0
        for rank in range(world):
            mine = results[rank]["snapshot"]
            self.assertEqual(set(mine), set(snaps[rank]))
            for name, arrays in mine.items():
                for k, v in arrays.items():
                    self.assertTrue(torch.equal(v, snaps[rank][name][k]),
                                    f"rank {rank} {name} {k}: processes differ from threads")
                    compared += 1
        print(f"  {compared} arrays (partitions, master, exp_avg, exp_avg_sq) bit-identical "
              "to the threads backend")

    def test_gpt_2_processes(self):
        self.check_gpt(2)

    def test_gpt_4_processes(self):
        self.check_gpt(4)

    def test_without_torchrun_variables_the_error_says_what_to_pass(self):
        results, procs_out, seconds = self.spawn("nostore", 2)
        self.assertAllRan(results, procs_out)
        for rank, r in enumerate(results):
            self.assertIn("store=", r.get("no_store_error", ""))
            self.assertIn("MASTER_ADDR", r["no_store_error"])
            self.assertEqual(r["world"], (rank, 2))
            self.assertEqual(len(r["losses"]), 2)
        mean = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])]
        for a, b in zip(self.ref_losses, mean):
            self.assertLessEqual(abs(a - b), 1e-5 * abs(a))
        print(f"\n({seconds:.1f} s) {results[0]['no_store_error']}")

    # ---- model zoo
    def test_zoo_2_processes(self):
        for name in ("encoder", "attn"):
            with self.subTest(name):
                build, loss_of, data = zoo_case(name)
                torch.manual_seed(0)
                model = build()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                ref = []
                for x in data:
                    loss = loss_of(model, x)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    ref.append(loss.item())
                results, procs_out, seconds = self.spawn("zoo-" + name, 2)
                self.assertAllRan(results, procs_out)
                for step, a in enumerate(ref):
                    mean = (results[0]["losses"][step] + results[1]["losses"][step]) / 2
                    print(f"\n{name}, 2 processes step {step}: reference {a:.9f}, mean {mean:.9f}"
                          f", relative diff {abs(a - mean) / abs(a):.2e}", end="")
                    self.assertLessEqual(abs(a - mean), 1e-5 * abs(a), f"step {step}")
                print(f"  ({seconds:.1f} s)")

    # ---- failures
    def test_a_killed_rank_is_named_at_once(self):
        self.killed_at = None
        results, procs_out, seconds = self.spawn("kill", 3)
        self.assertEqual(procs_out[1][0], -signal.SIGKILL, procs_out[1][1][-2000:])
        self.assertIsNotNone(self.killed_at)
        for rank in (0, 2):
            r, (code, err) = results[rank], procs_out[rank]
            self.assertIsNotNone(r, f"rank {rank} left no result (rc {code}): {err[-3000:]}")
            self.assertIn("error", r, f"rank {rank} did not fail")
            self.assertTrue(r["ztier_error"], r["error"])
            self.assertIn("rank 1", r["error"])
            self.assertIn("rank 1", err)
            waited = r["error_at"] - self.killed_at
            print(f"\nrank {rank} failed {waited:.2f} s after rank 1 was killed "
                  f"(comm.timeout 30): {r['error']}; engine closed in {r['closed_in']:.2f} s"
                  f" ({r.get('close_error', 'no error')})")
            self.assertLess(waited, 20)
            self.assertLess(r["error_at"] + r["closed_in"] - self.killed_at, 20)
        self.assertLess(seconds, 60)

    def test_a_hung_rank_is_named_after_the_timeout(self):
        self.killed_at = None
        results, procs_out, seconds = self.spawn("hang", 2, stopped=1)
        self.assertIsNotNone(self.killed_at, procs_out[1][1][-2000:])
        r, (code, err) = results[0], procs_out[0]
        self.assertIsNotNone(r, f"rank 0 left no result (rc {code}): {err[-3000:]}")
        self.assertIn("error", r, "rank 0 did not fail")
        self.assertTrue(r["ztier_error"], r["error"])
        self.assertIn("rank 1", r["error"])
        waited = r["error_at"] - self.killed_at
        print(f"\nrank 0 failed {waited:.2f} s after rank 1 stopped (comm.timeout 5): "
              f"{r['error']}; engine closed in {r['closed_in']:.2f} s "
              f"({r.get('close_error', 'no error')})")
        self.assertGreater(waited, 4)
        self.assertLess(waited, 15)
        self.assertLess(r["closed_in"], 10)

    def test_modules_in_another_order_fail_every_rank(self):
        results, procs_out, seconds = self.spawn("mismatch", 2)
        self.assertAllFailed(results, procs_out)
        for rank, r in enumerate(results):
            self.assertEqual(len(r["losses"]), 2, r["error"])  # steps 0 and 1 ran
            self.assertIn("closed_in", r)
            print(f"\nrank {rank} ({seconds:.1f} s): {r['error']}; engine closed in "
                  f"{r['closed_in']:.2f} s ({r.get('close_error', 'no error')})")

    def test_a_different_trace_is_named_at_step_end_on_every_rank(self):
        results, procs_out, seconds = self.spawn("trace", 2)
        self.assertAllFailed(results, procs_out)
        for rank, r in enumerate(results):
            self.assertIn("differs from rank", r["error"])
            self.assertLessEqual(len(r["losses"]), 1, r["error"])
            print(f"\nrank {rank} ({seconds:.1f} s): {r['error']}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        worker(*sys.argv[2:])
    unittest.main()
