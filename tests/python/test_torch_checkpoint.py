"""ztier.torch checkpoints: Offload.save_checkpoint / load_checkpoint.

World 1: a tiny GPT with dropout trained 3 steps, saved, trained 3 more;
a fresh model and optimizer (other initial weights, other RNG state) that
loads the checkpoint trains the same 3 steps with bit-identical losses,
weights and optimizer state (master, moments, step), and so does the saving
model itself rewound to the checkpoint after a stray forward and backward;
a save between backward and step (the overlapped step begun, a clip factor
pending) resumes with that step, bit-identical.
World 2 (ranks as threads): the same, bit for bit; resharding (saved at 2,
resumed at 1, and saved at 1, resumed at 2): the loaded partitions and
optimizer state are exactly the saved ones, rearranged, and the losses
after it follow the uninterrupted run within a measured tolerance. Export
(ztier.checkpoint_export) gives torch.load the fp32 weights under the
parameters' names and shapes, weights_only too, and offload(weights=) reads
the export itself back (torch's legacy format, no re-save). A flipped byte
in a shard is an error naming the file, from load and verify; a damaged
index is refused before anything changes. An lr scheduler (StepLR over two
parameter groups) resumes through `extra` and param_groups; a mismatched
group count is a clear error. Persistent buffers (BatchNorm statistics)
and off.optimizer(...)'s state resume too.
Skips, saying why, without torch.
"""

import copy
import inspect
import os
import sys
import unittest
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from torch_testing import TORCH_MISSING, run_ranks, tmpdir, torch, training_config  # noqa: E402

LR = dict(lr=1e-2, weight_decay=0.1)
BEFORE, AFTER = 3, 3  # steps before the save, and after it
# Cross-world-size resume: the losses of the 3 steps after the load against
# the uninterrupted run at the other world size, relative. The loaded state
# is bit-exact (assert_resharded); the losses differ by float32 rounding
# alone: the mean of two half-batch losses against the full-batch loss
# (3.8e-8 and 7.6e-8 at the first step, where the weights are identical),
# then the gradients' averaging. Measured (2-vCPU VM, torch 1.13, the same
# every run): at most 1.5e-7 both ways (2 -> 1: 3.8e-8, 1.5e-7, 1.0e-7;
# 1 -> 2: 7.6e-8, 1.5e-7, 1.0e-7), about one float32 ulp of losses near 10.
RESHARD_RTOL = 5e-7


config_text = training_config  # the shared training-test config


def snapshot(off, opt) -> dict:
    """This rank's partitions: each parameter's and its optimizer state
    (flat, padded), and the optimizer's step count."""
    out = {"step": opt.stats()["step"] if opt is not None else None}
    for slot in off._slots:
        n = off.engine.param_info(slot.pid).partition_numel
        part = torch.empty(n, dtype=slot.dtype)
        off.engine.partition_read(slot.pid, part)
        entry = {"param": part}
        if opt is not None:
            entry.update(opt.state_of(slot.param))
        out[slot.name] = entry
    return out


def full(parts, name: str, key: str, numel: int):
    """A parameter's `key` over every rank: the partitions end to end."""
    return torch.cat([p[name][key] for p in parts])[:numel]


@unittest.skipIf(torch is None, TORCH_MISSING)
class CheckpointTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import tiny_gpt
        cls.tiny_gpt = tiny_gpt
        torch.manual_seed(0)
        cls.init = copy.deepcopy(tiny_gpt.TinyGPT().state_dict())
        torch.manual_seed(7)
        cls.other_init = copy.deepcopy(tiny_gpt.TinyGPT().state_dict())
        cls.data = list(tiny_gpt.batches(BEFORE + AFTER))

    def fresh(self, dropout: float = 0.0, other: bool = False):
        """The tiny GPT with the run's initial weights, or (other) with
        different ones, which a checkpoint load must overwrite."""
        model = self.tiny_gpt.TinyGPT(dropout=dropout)
        model.load_state_dict(self.other_init if other else self.init)
        return model

    def step(self, model, opt, x, y, sched=None) -> float:
        loss = self.tiny_gpt.loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        return loss.item()

    def assert_same_state(self, a: dict, b: dict, what: str) -> None:
        self.assertEqual(a.keys(), b.keys(), what)
        self.assertEqual(a["step"], b["step"], what)
        for name in a:
            if name == "step":
                continue
            for key, t in a[name].items():
                self.assertTrue(torch.equal(t, b[name][key]), f"{what}: {name} {key}")

    # ------------------------------------------------------------ world 1
    def test_world1_resume_bit_identical(self):
        import ztier.torch
        path = tmpdir(self)
        ckpt = os.path.join(path, "ckpt")
        torch.manual_seed(1234)  # the dropout masks' RNG
        model = self.fresh(dropout=0.1)
        off = ztier.torch.offload(model, config_text(os.path.join(path, "a")))
        opt = off.adamw(keep_grads=True, **LR)  # .grad kept until step(): dropped by a load
        for x, y in self.data[:BEFORE]:
            self.step(model, opt, x, y)
        off.save_checkpoint(ckpt, opt, extra={"step": BEFORE})
        rng_at_save = torch.get_rng_state()
        losses = [self.step(model, opt, x, y) for x, y in self.data[BEFORE:]]
        final = snapshot(off, opt)
        weights = off.full_parameters()
        print(f"\nworld 1 resume: losses after the save {losses}; {ztier.checkpoint_verify(ckpt)}")

        # The same model rewound: a stray forward and backward leave .grad
        # and ztier's pending gradients behind; the load drops both
        # (clipping hands them to ztier and leaves a clip factor pending).
        self.tiny_gpt.loss_of(model, *self.data[0]).backward()
        opt.clip_grad_norm_(1e-3)
        self.assertIsNotNone(model.wte.weight.grad)
        self.assertGreater(off.engine.grad_stats().count, 0)
        self.assertEqual(off.load_checkpoint(ckpt), {"step": BEFORE})  # default: its optimizer
        self.assertTrue(all(p.grad is None for p in model.parameters()))
        self.assertTrue(torch.equal(torch.get_rng_state(), rng_at_save))
        again = [self.step(model, opt, x, y) for x, y in self.data[BEFORE:]]
        self.assertEqual(again, losses)
        self.assert_same_state(snapshot(off, opt), final, "rewound")
        off.close()

        # A fresh model (other weights, other RNG state) and optimizer.
        torch.manual_seed(999)
        model = self.fresh(dropout=0.1, other=True)
        off = ztier.torch.offload(model, config_text(os.path.join(path, "b")))
        opt = off.adamw(**LR)
        self.assertEqual(off.load_checkpoint(ckpt, opt), {"step": BEFORE})
        self.assertTrue(torch.equal(torch.get_rng_state(), rng_at_save))
        resumed = [self.step(model, opt, x, y) for x, y in self.data[BEFORE:]]
        self.assertEqual(resumed, losses)
        self.assert_same_state(snapshot(off, opt), final, "fresh")
        resumed_weights = off.full_parameters()
        off.close()
        self.assertEqual(resumed_weights.keys(), weights.keys())
        for name, w in weights.items():
            self.assertTrue(torch.equal(resumed_weights[name], w), name)

        # The dropout masks depend on the restored RNG: another state gives
        # other losses (so the equality above is not vacuous).
        torch.manual_seed(999)
        model = self.fresh(dropout=0.1, other=True)
        off = ztier.torch.offload(model, config_text(os.path.join(path, "c")))
        opt = off.adamw(**LR)
        off.load_checkpoint(ckpt, opt)
        torch.manual_seed(999)
        self.assertNotEqual(self.step(model, opt, *self.data[BEFORE]), losses[0])
        off.close()

    def test_background_save(self):
        """A background save holds the state of the step it was begun after,
        though the next steps run while it is written; training itself is
        not perturbed (losses equal a run that never saved), and the next
        optimizer step publishes it. World 1 and 2."""
        import ztier.torch
        path = tmpdir(self)

        def run(world: int, tag: str, save: bool, load: str = None) -> list:
            losses = [None] * world

            def rank_main(rank, group):
                model = self.fresh()
                off = ztier.torch.offload(model, config_text(os.path.join(path, f"{tag}{rank}")),
                                          rank=rank, world_size=world, local_group=group)
                opt = off.adamw(**LR)
                data = [(x[rank::world], y[rank::world]) for x, y in self.data]
                if load is not None:
                    # Each rank takes back its own extra (the saving world size).
                    self.assertEqual(off.load_checkpoint(load, opt), {"rank": rank})
                    data = data[BEFORE:]
                out = []
                for k, (x, y) in enumerate(data):
                    if save and k == BEFORE:
                        off.save_checkpoint(os.path.join(path, f"bg{world}"), opt,
                                            extra={"rank": rank}, background=True)
                        # Not published yet: the next optimizer step does it.
                        self.assertFalse(os.path.exists(os.path.join(path, f"bg{world}")))
                    out.append(self.step(model, opt, x, y))
                    if save and k == BEFORE:
                        self.assertTrue(os.path.exists(os.path.join(path, f"bg{world}")))
                off.wait_checkpoint()  # nothing left: returns at once
                losses[rank] = out
                off.close()

            if world == 1:
                rank_main(0, None)
            else:
                run_ranks(world, rank_main)
            return losses

        for world in (1, 2):
            plain = run(world, f"p{world}_", save=False)
            saving = run(world, f"s{world}_", save=True)
            self.assertEqual(saving, plain, f"world {world}: the background save changed training")
            ckpt = os.path.join(path, f"bg{world}")
            self.assertIn(f"step {BEFORE}", ztier.checkpoint_verify(ckpt))
            resumed = run(world, f"r{world}_", save=False, load=ckpt)
            self.assertEqual(resumed, [p[BEFORE:] for p in plain], f"world {world}: resumed")

    def test_save_between_backward_and_step(self):
        """Saved after backward, with the overlapped step begun and a clip
        factor pending: the resumed run's step() uses the saved gradients
        and factor, bit-identical to the run that never stopped."""
        import ztier.torch
        path = tmpdir(self)
        ckpt = os.path.join(path, "ckpt")

        def run(tag, save=False, resume=False):
            model = self.fresh()
            off = ztier.torch.offload(model, config_text(os.path.join(path, tag)))
            opt = off.adamw(overlap=True, **LR)
            losses, start = [], 0
            if resume:
                off.load_checkpoint(ckpt, opt)
                opt.step()  # the saved step: its gradients are in the checkpoint
                opt.zero_grad()
                start = BEFORE
            for i, (x, y) in enumerate(self.data[start:], start):
                loss = self.tiny_gpt.loss_of(model, x, y)
                loss.backward()
                if i == BEFORE - 1:
                    opt.clip_grad_norm_(0.5)
                    if save:
                        self.assertTrue(opt._begun)  # the step began during backward
                        off.save_checkpoint(ckpt, opt)
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            weights = off.full_parameters()
            off.close()
            return losses, weights

        plain, w_plain = run("a")
        saved, w_saved = run("b", save=True)
        resumed, w_resumed = run("c", resume=True)
        self.assertEqual(saved, plain)
        self.assertEqual(resumed, plain[BEFORE:])
        for name, w in w_plain.items():
            self.assertTrue(torch.equal(w_saved[name], w), name)
            self.assertTrue(torch.equal(w_resumed[name], w), name)

    # ------------------------------------------------------------ world 2, reshard
    def session(self, world: int, cfg: str, load=None, save=None, other=False) -> list:
        """One training run at `world` (ranks as threads, half a batch each
        at 2) over self.data[start:], start = BEFORE after a `load`, else 0;
        `save` a path: saved after BEFORE steps. Returns per rank: the
        losses, the snapshot after the load or at the save, the final one."""
        import ztier.torch
        out = [None] * world

        def rank_main(rank, group):
            model = self.fresh(other=other)
            off = ztier.torch.offload(model, cfg, rank=rank, world_size=world,
                                      local_group=group)
            opt = off.adamw(**LR)
            res = {"losses": [], "at_ckpt": None}
            if load is not None:
                self.assertIsNone(off.load_checkpoint(load, opt))
                res["at_ckpt"] = snapshot(off, opt)
            start = BEFORE if load is not None else 0
            for i, (x, y) in enumerate(self.data[start:], start):
                if save is not None and i == BEFORE:
                    off.save_checkpoint(save, opt)
                    res["at_ckpt"] = snapshot(off, opt)
                half = x.shape[0] // world
                sl = slice(rank * half, (rank + 1) * half)
                res["losses"].append(self.step(model, opt, x[sl], y[sl]))
            res["final"] = snapshot(off, opt)
            res["numel"] = {s.name: s.numel for s in off._slots}
            off.close()
            out[rank] = res
        if world == 1:
            rank_main(0, None)
        else:
            run_ranks(world, rank_main)
        return out

    def assert_resharded(self, saved: list, loaded: list, what: str) -> None:
        """The state loaded at one world size is the saved one, bit for bit."""
        numel = saved[0]["numel"]
        self.assertEqual(loaded[0]["at_ckpt"]["step"], saved[0]["at_ckpt"]["step"])
        for name, n in numel.items():
            for key in ("param", "master", "exp_avg", "exp_avg_sq"):
                a = full([r["at_ckpt"] for r in saved], name, key, n)
                b = full([r["at_ckpt"] for r in loaded], name, key, n)
                self.assertTrue(torch.equal(a, b), f"{what}: {name} {key}")

    def test_world2_resume_and_reshard(self):
        path = tmpdir(self)
        ck1, ck2 = os.path.join(path, "ck1"), os.path.join(path, "ck2")
        cfg = config_text(path)
        u1 = self.session(1, cfg, save=ck1)
        u2 = self.session(2, cfg, save=ck2)
        # Saved at 2, resumed at 2: bit-identical, every rank.
        r22 = self.session(2, cfg, load=ck2, other=True)
        for rank in range(2):
            self.assertEqual(r22[rank]["losses"], u2[rank]["losses"][BEFORE:], f"rank {rank}")
            self.assert_same_state(r22[rank]["final"], u2[rank]["final"], f"2 -> 2 rank {rank}")
        # Resharded: the loaded state is the saved one, rearranged ...
        r21 = self.session(1, cfg, load=ck2, other=True)
        r12 = self.session(2, cfg, load=ck1, other=True)
        self.assert_resharded(u2, r21, "2 -> 1")
        self.assert_resharded(u1, r12, "1 -> 2")
        # ... and training goes on as the uninterrupted run at the other world
        # size (the mean of the ranks' half-batch losses is the full-batch loss).
        mean2 = [(a + b) / 2 for a, b in zip(u2[0]["losses"], u2[1]["losses"])][BEFORE:]
        mean12 = [(a + b) / 2 for a, b in zip(r12[0]["losses"], r12[1]["losses"])]
        rel21 = [abs(a - b) / abs(b) for a, b in zip(r21[0]["losses"], mean2)]
        rel12 = [abs(a - b) / abs(b) for a, b in zip(mean12, u1[0]["losses"][BEFORE:])]
        print(f"\nreshard: 2 -> 1 relative loss differences {['%.1e' % r for r in rel21]}, "
              f"1 -> 2 {['%.1e' % r for r in rel12]}")
        self.assertLessEqual(max(rel21), RESHARD_RTOL)
        self.assertLessEqual(max(rel12), RESHARD_RTOL)

    # ------------------------------------------------------------ export
    def test_export_torch_load(self):
        import ztier.torch
        path = tmpdir(self)
        ckpt, out = os.path.join(path, "ckpt"), os.path.join(path, "weights.pt")
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(os.path.join(path, "a")))
        opt = off.adamw(**LR)
        for x, y in self.data[:2]:
            self.step(model, opt, x, y)
        off.save_checkpoint(ckpt, opt)
        weights = off.full_parameters()
        off.close()
        ztier.checkpoint_export(ckpt, out)
        shapes = {n: tuple(p.shape) for n, p in self.fresh().named_parameters()}
        loads = [{}]
        if "weights_only" in inspect.signature(torch.load).parameters:
            loads.append({"weights_only": True})
        for kwargs in loads:
            sd = torch.load(out, **kwargs)
            self.assertEqual(list(sd), list(shapes), kwargs)  # named_parameters() order
            for name, t in sd.items():
                self.assertEqual(tuple(t.shape), shapes[name], name)
                self.assertEqual(t.dtype, torch.float32, name)
                self.assertTrue(torch.equal(t, weights[name]), name)
        # Back into an offloaded model through the weights= path, from the
        # export itself: torch's legacy (bare pickle) format, which
        # StateDictFile streams as it does the zip format.
        self.assertFalse(zipfile.is_zipfile(out))
        with ztier.torch.meta_init():
            model = self.tiny_gpt.TinyGPT()
        off = ztier.torch.offload(model, config_text(os.path.join(path, "b")), weights=out)
        back = off.full_parameters()
        off.close()
        for name, w in weights.items():
            self.assertTrue(torch.equal(back[name], w), name)
        # bfloat16 parameters: the export holds the fp32 master weights.
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(os.path.join(path, "c")),
                                  dtype=torch.bfloat16)
        opt = off.adamw(**LR)
        for x, y in self.data[:2]:
            self.step(model, opt, x, y)
        off.save_checkpoint(ckpt, opt)  # replaces the fp32 one
        masters = {n: opt.state_of(p)["master"].view(shapes[n])
                   for n, p in model.named_parameters()}
        weights = off.full_parameters()
        off.close()
        ztier.checkpoint_export(ckpt, out)
        sd = torch.load(out)
        for name, t in sd.items():
            self.assertEqual(t.dtype, torch.float32, name)
            self.assertTrue(torch.equal(t, masters[name]), name)
            self.assertTrue(torch.equal(t.to(torch.bfloat16), weights[name]), name)

    # ------------------------------------------------------------ damage
    def test_corruption_named(self):
        import ztier.torch
        path = tmpdir(self)
        ckpt = os.path.join(path, "ckpt")
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(os.path.join(path, "a")))
        opt = off.adamw(**LR)
        self.step(model, opt, *self.data[0])
        off.save_checkpoint(ckpt, opt)
        self.step(model, opt, *self.data[1])
        before = off.full_parameters()

        def flip(name: str) -> None:
            with open(os.path.join(ckpt, name), "r+b") as f:
                f.seek(0, os.SEEK_END)
                f.seek(f.tell() // 2)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0x40]))

        # A damaged index is refused before anything changes: training goes on.
        flip("rank-00000.json")
        with self.assertRaises(ztier.ZtierError) as cm:
            off.load_checkpoint(ckpt, opt)
        self.assertIn("rank-00000.json", str(cm.exception))
        after = off.full_parameters()
        for name, w in before.items():
            self.assertTrue(torch.equal(after[name], w), name)
        self.step(model, opt, *self.data[2])
        off.close()
        flip("rank-00000.json")  # undone

        # A damaged data chunk: verify and load both name the file.
        ztier.checkpoint_verify(ckpt)
        flip("rank-00000.bin")
        with self.assertRaises(ztier.ZtierError) as cm:
            ztier.checkpoint_verify(ckpt)
        self.assertIn("rank-00000.bin", str(cm.exception))
        print(f"\nverify: {cm.exception}")
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(os.path.join(path, "b")))
        opt = off.adamw(**LR)
        with self.assertRaises(ztier.ZtierError) as cm:
            off.load_checkpoint(ckpt, opt)
        self.assertIn("rank-00000.bin", str(cm.exception))
        print(f"load: {cm.exception}")
        off.close()

    # ------------------------------------------------------------ python state
    def test_lr_scheduler_resumes(self):
        import ztier.torch
        path = tmpdir(self)
        ckpt = os.path.join(path, "ckpt")

        def make(model, off, groups=2):
            decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
            rest = [p for n, p in model.named_parameters() if p.dim() < 2]
            params = ([{"params": decay}, {"params": rest, "weight_decay": 0.0}] if groups == 2
                      else decay + rest)
            opt = off.adamw(params, **LR)
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

        model = self.fresh()
        off = ztier.torch.offload(model, config_text(os.path.join(path, "a")))
        opt, sched = make(model, off)
        for x, y in self.data[:BEFORE]:
            self.step(model, opt, x, y, sched)
        off.save_checkpoint(ckpt, opt, extra={"sched": sched.state_dict()})
        lrs_at_save = [g["lr"] for g in opt.param_groups]
        lrs, losses = [], []
        for x, y in self.data[BEFORE:]:
            losses.append(self.step(model, opt, x, y, sched))
            lrs.append([g["lr"] for g in opt.param_groups])
        off.close()
        self.assertNotEqual(lrs_at_save[0], LR["lr"])  # the scheduler has moved it

        model = self.fresh(other=True)
        off = ztier.torch.offload(model, config_text(os.path.join(path, "b")))
        opt, sched = make(model, off)
        extra = off.load_checkpoint(ckpt, opt)
        sched.load_state_dict(extra["sched"])
        self.assertEqual([g["lr"] for g in opt.param_groups], lrs_at_save)
        self.assertEqual(opt.param_groups[1]["weight_decay"], 0.0)
        lrs2, losses2 = [], []
        for x, y in self.data[BEFORE:]:
            losses2.append(self.step(model, opt, x, y, sched))
            lrs2.append([g["lr"] for g in opt.param_groups])
        off.close()
        print(f"\nlr after the save {lrs}, resumed {lrs2}")
        self.assertEqual(lrs2, lrs)
        self.assertEqual(losses2, losses)

        # Another group count: refused, saying so, before anything changes.
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(os.path.join(path, "c")))
        opt, _ = make(model, off, groups=1)
        with self.assertRaisesRegex(ValueError, "2 optimizer parameter group.*has 1"):
            off.load_checkpoint(ckpt, opt)
        off.close()

    def test_buffers_and_partition_optimizer(self):
        """A BatchNorm's running statistics (persistent buffers) and a stock
        torch optimizer's state (off.optimizer, world 1) resume too."""
        import ztier.torch
        from torch import nn
        path = tmpdir(self)
        ckpt = os.path.join(path, "ckpt")

        def make(seed):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Dropout(0.2), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(3)
        batches = [(torch.randn(6, 8, generator=g), torch.randn(6, 1, generator=g))
                   for _ in range(4)]

        def run(model, opt, data):
            out = []
            for x, y in data:
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append(loss.item())
            return out

        model = make(0)
        off = ztier.torch.offload(model, config_text(os.path.join(path, "a")))
        opt = off.optimizer(torch.optim.SGD, lr=0.05, momentum=0.9)
        run(model, opt, batches[:2])
        off.save_checkpoint(ckpt, opt)
        losses = run(model, opt, batches[2:])
        stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
        off.close()

        model = make(1)
        off = ztier.torch.offload(model, config_text(os.path.join(path, "b")))
        opt = off.optimizer(torch.optim.SGD, lr=0.05, momentum=0.9)
        off.load_checkpoint(ckpt, opt)
        self.assertEqual(run(model, opt, batches[2:]), losses)
        self.assertTrue(torch.equal(model[1].running_mean, stats[0]))
        self.assertTrue(torch.equal(model[1].num_batches_tracked, stats[1]))
        off.close()


if __name__ == "__main__":
    unittest.main()
