"""ztier.torch trains a mixture-of-experts model whose routing changes from
step to step, with and without router hints (Offload.hint).

The model is made of stock torch modules: an input nn.Linear, MoE blocks
(a router nn.Linear(h, E) and E expert MLPs, each nn.Sequential(nn.Linear,
nn.GELU, nn.Linear)), a head. Each block sends the whole batch to the top-2
experts of the router's logits averaged over the batch, so the experts that
run (and those that get a gradient) change between steps. It is trained
three ways from the same weights: plain torch, offloaded, and offloaded with
the block's forward hinting the chosen experts right after the router ran.
Losses and final weights are bit-identical across the three; the hinted run
gathers ahead because of the hints and demand-fetches less, and the
adaptive trace policy keeps following learned orders throughout (the trace
stays COMPLETE). Offload.hint refuses a module that is not the model's. Skips, saying why, without torch.
"""

import copy
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from torch_testing import TORCH_MISSING, tmpdir, torch  # noqa: E402

if torch is not None:
    from torch import nn
    import torch.nn.functional as F

STEPS = 8
BATCH, IN, HIDDEN, FFN, EXPERTS, BLOCKS, CLASSES = 8, 12, 16, 24, 6, 2, 5
TOP = 2
LR = dict(lr=1e-2, weight_decay=0.1)

if torch is not None:
    class MoEBlock(nn.Module):
        """x + the gate-weighted sum of the top-2 experts' outputs."""

        def __init__(self):
            super().__init__()
            self.router = nn.Linear(HIDDEN, EXPERTS)
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))
                for _ in range(EXPERTS))
            self.hint = None   # set to off.hint to hint the chosen experts
            self.routes = []   # the experts chosen, per call

        def forward(self, x):
            gate = self.router(x).mean(0)
            weight, index = torch.topk(gate, TOP)
            weight = torch.softmax(weight, 0)
            chosen = [self.experts[i] for i in index.tolist()]
            self.routes.append(tuple(index.tolist()))
            if self.hint is not None:
                self.hint(chosen)  # they run next, in this order
            out = x
            for k, expert in enumerate(chosen):
                out = out + weight[k] * expert(x)
            return out

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(IN, HIDDEN)
            self.blocks = nn.ModuleList(MoEBlock() for _ in range(BLOCKS))
            self.head = nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            for block in self.blocks:
                h = block(h)
            return self.head(h)


def config_for(model, path):
    import ztier.torch
    # No parameter is persistent (the model is tiny: by default all would
    # be), so every module is fetched and prefetched each step.
    return ztier.torch.model_config(model, path, sub_group_size=3000, optimizer_buffers=2,
                                    coordinator={"param_persistence_threshold": 0})


@unittest.skipIf(torch is None, TORCH_MISSING)
class MoETest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.init = copy.deepcopy(MoE().state_dict())
        g = torch.Generator().manual_seed(1)
        # Each batch shifted by an offset of its own: the routing changes.
        cls.data = [(torch.randn(BATCH, IN, generator=g) + 2 * torch.randn(IN, generator=g),
                     torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(STEPS)]
        model = cls.fresh()
        opt = torch.optim.AdamW(model.parameters(), **LR)
        cls.ref_losses = cls.train(model, opt)
        cls.ref_routes = [b.routes for b in model.blocks]
        cls.ref_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    @classmethod
    def fresh(cls):
        model = MoE()
        model.load_state_dict(cls.init)
        return model

    @classmethod
    def train(cls, model, opt):
        losses = []
        for x, y in cls.data:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # experts not run: no gradient, not updated
            losses.append(loss.item())
        return losses

    def offloaded(self, hints: bool):
        """Trains the model offloaded; returns (losses, weights, stats, routes)."""
        import ztier.torch
        model = self.fresh()
        off = ztier.torch.offload(model, config_for(model, tmpdir(self, "ztier_moe_")))
        self.addCleanup(off.close)
        if hints:
            for block in model.blocks:
                block.hint = off.hint
        losses = self.train(model, off.adamw(**LR))
        stats = off.engine.stats()
        weights = off.full_parameters()
        self.assertEqual(losses, self.ref_losses)
        self.assertEqual([b.routes for b in model.blocks], self.ref_routes)
        self.assertEqual(set(weights), set(self.ref_weights))
        for name, w in weights.items():
            self.assertTrue(torch.equal(w, self.ref_weights[name]),
                            f"{name}: max diff {(w - self.ref_weights[name]).abs().max()}")
        for name, p in model.named_parameters():
            self.assertEqual(p.data.numel(), 0, name)
        keys = ("steps", "fetch_calls", "demand_gathers", "prefetch_gathers",
                "fetch_calls_with_demand", "trace_mode", "trace_orders", "trace_switches",
                "trace_resyncs", "trace_off", "hints", "hint_gathers", "speculative_gathers",
                "speculation_hits", "speculation_misses", "speculation_wasted", "repacks")
        print(f"\nMoE {'with' if hints else 'without'} hints: losses "
              f"{losses[0]:.6f} .. {losses[-1]:.6f}\n  " +
              ", ".join(f"{k} {stats[k]}" for k in keys))
        return losses, weights, stats, off

    def test_routing_changes_between_steps(self):
        for b, routes in enumerate(self.ref_routes):
            self.assertEqual(len(routes), STEPS)
            self.assertGreater(len({frozenset(r) for r in routes}), 1,
                               f"block {b} chose the same experts every step: {routes}")

    def test_without_hints_bit_identical(self):
        _, _, stats, _ = self.offloaded(hints=False)
        self.assertEqual(stats["steps"], STEPS)
        self.assertEqual(stats["hints"], 0)
        self.assertEqual(stats["hint_gathers"], 0)
        self.assertEqual(stats["trace_mode"], 1, "the trace stays COMPLETE")
        self.assertGreaterEqual(stats["trace_orders"], 1)
        self.assertGreater(stats["prefetch_gathers"], 0)

    def test_with_hints_bit_identical_and_gathered_ahead(self):
        _, _, stats, off = self.offloaded(hints=True)
        self.assertEqual(stats["steps"], STEPS)
        # Each hint names two experts, each standing for its two nn.Linear.
        self.assertEqual(stats["hints"], STEPS * BLOCKS * TOP * 2)
        self.assertGreater(stats["hint_gathers"], 0)
        self.assertEqual(stats["trace_mode"], 1, "the trace stays COMPLETE")
        self.assertGreaterEqual(stats["trace_orders"], 1)
        self.assertGreater(stats["prefetch_gathers"], 0)
        # A module of the model with nothing to fetch is no hint at all.
        off.hint(off.model.blocks[0].experts[0][1])  # its nn.GELU
        self.assertEqual(off.engine.stats()["hints"], stats["hints"])

    def test_hints_cut_demand_fetches(self):
        # The engine's decisions depend only on the hook calls and hints, so
        # the counts are the same every run. Without hints a choice is
        # speculated (the most frequent expert there), with them it is known
        # once the order has choice slots.
        plain = self.offloaded(hints=False)[2]
        hinted = self.offloaded(hints=True)[2]
        self.assertLess(hinted["fetch_calls_with_demand"], plain["fetch_calls_with_demand"])
        self.assertLess(hinted["demand_gathers"], plain["demand_gathers"])

    def test_hint_refuses_a_module_outside_the_model(self):
        import ztier.torch
        model = self.fresh()
        off = ztier.torch.offload(model, config_for(model, tmpdir(self, "ztier_moe_")))
        self.addCleanup(off.close)
        stranger = nn.Linear(HIDDEN, FFN)
        with self.assertRaisesRegex(ValueError, r"Linear\(in_features=16, out_features=24.*"
                                                r"not a module of the model"):
            off.hint([model.blocks[0].experts[1], stranger])
        # The same expert of another model (a copy made before offload()).
        with self.assertRaisesRegex(ValueError, r"Sequential\(0: Linear, 1: GELU, 2: Linear\)"
                                                r".*not a module of the model"):
            off.hint(self.fresh().blocks[0].experts[1])
        with self.assertRaises(TypeError):
            off.hint([model.blocks[0].router.weight])
        self.assertEqual(off.engine.stats()["hints"], 0, "nothing of a refused hint is given")
        # A parent stands for the modules it contains that own parameters.
        off.hint(model.blocks[0].experts[1])
        off.hint([])
        self.assertEqual(off.engine.stats()["hints"], 2)


if __name__ == "__main__":
    unittest.main()
