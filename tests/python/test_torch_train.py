"""ztier.torch trains a tiny GPT with every parameter on NVMe.

World 1: losses and final weights bit-identical to the same loop without
ztier, with a stock torch.optim.AdamW over the partitions and with ztier's
own AdamW (its state on NVMe, several sub-groups; the state itself equals
torch's too), and ztier's Adam (L2 weight decay) against torch.optim.Adam. World 2 (two ranks as threads, local collective, half a batch
each, gradients reduce-scattered by ztier): losses within 1e-5 (relative) of
the single-process full-batch loop, and ztier's AdamW bit-identical to torch's
AdamW over the same partitions. Skips, saying why, without torch.
"""

import copy
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from torch_testing import TORCH_MISSING, run_ranks, tmpdir, torch, training_config  # noqa: E402

STEPS = 20
LR = dict(lr=1e-2, weight_decay=0.1)


config_text = training_config  # the shared training-test config


@unittest.skipIf(torch is None, TORCH_MISSING)
class TrainTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import tiny_gpt
        cls.tiny_gpt = tiny_gpt
        torch.manual_seed(0)
        cls.init = copy.deepcopy(tiny_gpt.TinyGPT().state_dict())
        cls.data = list(tiny_gpt.batches(STEPS))
        # The reference: the same loop without ztier.
        model = cls.fresh()
        opt = torch.optim.AdamW(model.parameters(), **LR)
        cls.ref_losses = cls.train(model, opt, set_to_none=True)
        cls.ref_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        cls.ref_state = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
                         for n, p in model.named_parameters()}
        with torch.no_grad():
            cls.ref_eval = model(cls.data[0][0])

    @classmethod
    def train(cls, model, opt, after_step=None, **zero_grad):
        """STEPS steps of the tiny GPT over cls.data; returns the losses.
        `after_step` runs after each step; `zero_grad` goes to opt.zero_grad."""
        losses = []
        for x, y in cls.data:
            loss = cls.tiny_gpt.loss_of(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(**zero_grad)
            losses.append(loss.item())
            if after_step:
                after_step()
        return losses

    @classmethod
    def fresh(cls):
        model = cls.tiny_gpt.TinyGPT()
        model.load_state_dict(cls.init)
        return model

    def test_world1_bit_identical(self):
        import ztier.torch
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(tmpdir(self)))
        opt = off.optimizer(torch.optim.AdamW, **LR)
        # Between steps no parameter has data outside ztier (its shape
        # still reads as the full shape).
        shapes = {n: p.shape for n, p in self.fresh().named_parameters()}
        losses = self.train(model, opt, after_step=lambda: self.assertTrue(
            all(p.data.numel() == 0 and p.shape == shapes[n]
                for n, p in model.named_parameters())))
        # Evaluation (no backward) through the same hooks, then the weights
        # (partition reads while the eval's prefetches may still be in flight).
        with torch.no_grad():
            logits = model(self.data[0][0])
        self.assertTrue(torch.equal(logits, self.ref_eval))
        off.engine.release_all()  # what the eval prefetched for a backward
        stats = off.engine.stats()
        weights = off.full_parameters()
        off.close()
        print("\nworld 1 losses (reference, ztier):")
        for step, (a, b) in enumerate(zip(self.ref_losses, losses)):
            print(f"  step {step:2d}  {a:.9f}  {b:.9f}")
        print(f"  stats: {stats}")
        self.assertEqual(losses, self.ref_losses)
        self.assertEqual(set(weights), set(self.ref_weights))
        for name, w in weights.items():
            self.assertTrue(torch.equal(w, self.ref_weights[name]), name)
        self.assertGreater(stats["nvme_reads"], 0)
        self.assertGreater(stats["nvme_bytes_written"], 0)
        self.assertEqual(stats["steps"], STEPS)
        self.assertEqual(stats["grad_reduces"], STEPS * len(weights))
        self.assertEqual(stats["live_numel"], 0)

    def test_world1_ztier_adamw_on_nvme_bit_identical(self):
        import ztier.torch
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(tmpdir(self)))
        opt = off.adamw(**LR)
        losses = self.train(model, opt)
        weights = off.full_parameters()
        ostats = opt.stats()
        states = {n: opt.state_of(p) for n, p in model.named_parameters()}
        off.close()
        print(f"\nztier AdamW, world 1: losses {losses[0]:.6f} .. {losses[-1]:.6f}; {ostats}")
        self.assertEqual(losses, self.ref_losses)
        self.assertEqual(set(weights), set(self.ref_weights))
        for name, w in weights.items():
            self.assertTrue(torch.equal(w, self.ref_weights[name]), name)
            st = states[name]
            self.assertTrue(torch.equal(st["master"].view_as(w), self.ref_weights[name]), name)
            for k in ("exp_avg", "exp_avg_sq"):
                self.assertTrue(torch.equal(st[k].view_as(w), self.ref_state[name][k]),
                                f"{name} {k}")
        self.assertEqual(ostats["step"], STEPS)
        self.assertGreater(ostats["sub_groups"], 1)
        self.assertGreater(ostats["bytes_read"], 0)
        self.assertLessEqual(ostats["peak_buffers"], 2)

    def test_world1_ztier_adam_l2_bit_identical(self):
        import ztier.torch
        hyper = dict(lr=1e-2, weight_decay=0.1)
        model = self.fresh()
        opt = torch.optim.Adam(model.parameters(), **hyper)
        ref = self.train(model, opt, set_to_none=True)
        ref_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        model = self.fresh()
        off = ztier.torch.offload(model, config_text(tmpdir(self)))
        zopt = off.adam(**hyper)
        losses = self.train(model, zopt)
        weights = off.full_parameters()
        off.close()
        self.assertEqual(losses, ref)
        self.assertEqual(set(weights), set(ref_weights))
        for name, w in weights.items():
            self.assertTrue(torch.equal(w, ref_weights[name]), name)

    def run_world2(self, make_optimizer):
        """Two ranks as threads (local collective), half a batch each, for
        STEPS steps; returns each rank's losses."""
        import ztier.torch
        path = tmpdir(self)
        losses = [[None] * STEPS for _ in range(2)]

        def rank_main(rank, group):
            model = self.fresh()
            off = ztier.torch.offload(model, config_text(path), rank=rank, world_size=2,
                                      local_group=group)
            opt = make_optimizer(off)
            for step, (x, y) in enumerate(self.data):
                half = x.shape[0] // 2
                sl = slice(rank * half, (rank + 1) * half)
                loss = self.tiny_gpt.loss_of(model, x[sl], y[sl])
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[rank][step] = loss.item()
            off.close()
        run_ranks(2, rank_main)
        return losses

    def test_world2_ztier_adamw_equals_torch_adamw_on_partitions(self):
        native = self.run_world2(lambda off: off.adamw(**LR))
        stock = self.run_world2(lambda off: off.optimizer(torch.optim.AdamW, **LR))
        print(f"\nworld 2, ztier AdamW vs torch AdamW on partitions: rank 0 last loss "
              f"{native[0][-1]:.9f} / {stock[0][-1]:.9f}")
        self.assertEqual(native, stock)

    def test_world2_local_ranks(self):
        losses = self.run_world2(lambda off: off.optimizer(torch.optim.AdamW, **LR))
        mean = [(a + b) / 2 for a, b in zip(*losses)]
        print("\nworld 2 losses (reference full batch, mean of the 2 ranks, relative diff):")
        for step, (a, b) in enumerate(zip(self.ref_losses, mean)):
            print(f"  step {step:2d}  {a:.9f}  {b:.9f}  {abs(a - b) / abs(a):.2e}")
        for a, b in zip(self.ref_losses, mean):
            self.assertLessEqual(abs(a - b), 1e-5 * abs(a))


if __name__ == "__main__":
    unittest.main()
