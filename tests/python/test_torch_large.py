"""Training larger than memory with ztier.torch: construction on the meta
device (module by module, initialised by reset_parameters, an init function
or a streamed state-dict file), gradients streamed to NVMe during backward
and accumulated there, bf16 / fp16 parameters with fp32 master weights,
gradient clipping and dynamic loss scaling inside the optimizer step, world
2 with gradients on NVMe, and peak RSS flat across model sizes.

Each training comparison runs the same loop with plain torch and asserts
equal results: bit for bit where ztier computes what torch computes (bf16 /
fp16 against torch's own fp32-master loop, accumulation, init), within a
few float32 ulps where a sum is ordered differently (the global gradient
norm, the world-2 reduce). Skips, saying why, without torch.
"""

import copy
import json
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from torch_testing import ROOT, TORCH_MISSING, run_ranks, tmpdir, torch  # noqa: E402

if torch is not None:
    from torch import nn
    import torch.nn.functional as F


def config(model, path, gradients="nvme", **kw):
    import ztier.torch
    return ztier.torch.model_config(model, path, sub_group_size=3000, optimizer_buffers=2,
                                    gradients=gradients, **kw)


if torch is not None:
    class Fp32Compute(nn.Module):
        """Linear layers whose low-precision weights are used in float32
        (CPU torch 1.13 has no fp16 matmul): gradients reach the weights in
        their own dtype, as on a GPU."""

        def __init__(self, dtype):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 8).to(dtype))
            self.w2 = nn.Parameter(torch.randn(1, 16).to(dtype))

        def forward(self, x):
            return F.linear(torch.tanh(F.linear(x, self.w1.float())), self.w2.float())


@unittest.skipIf(torch is None, TORCH_MISSING)
class LargeTest(unittest.TestCase):
    # ------------------------------------------------------------ construction
    def test_meta_init_reset_parameters_equals_eager_construction(self):
        import tiny_gpt
        import ztier.torch
        torch.manual_seed(3)
        eager = tiny_gpt.TinyGPT()
        with ztier.torch.meta_init():
            lazy = tiny_gpt.TinyGPT()
        self.assertTrue(all(p.is_meta for p in lazy.parameters()))
        self.assertIs(lazy.head.weight, lazy.wte.weight)  # tying survives
        torch.manual_seed(3)  # the same draws, module by module in the same order
        off = ztier.torch.offload(lazy, config(lazy, tmpdir(self)))
        self.addCleanup(off.close)
        self.assertIs(lazy.head.weight, lazy.wte.weight)
        got = off.full_parameters()
        for name, p in eager.named_parameters():
            self.assertTrue(torch.equal(got[name], p), name)

    def test_meta_init_with_init_function_and_training(self):
        import tiny_gpt
        import ztier.torch

        def init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        torch.manual_seed(5)
        ref = tiny_gpt.TinyGPT()
        torch.manual_seed(7)
        for _, m in ref.named_modules():  # named_modules order, tied weight once
            if m is ref.head:
                continue
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # what ztier runs first
            init(m)
        with ztier.torch.meta_init():
            model = tiny_gpt.TinyGPT()
        torch.manual_seed(7)
        off = ztier.torch.offload(model, config(model, tmpdir(self)), init=init)
        self.addCleanup(off.close)
        data = list(tiny_gpt.batches(3))
        self.assertTrue(torch.equal(off.full_parameters()["wte.weight"], ref.wte.weight))
        ropt, zopt = torch.optim.AdamW(ref.parameters(), lr=1e-2), off.adamw(lr=1e-2)
        for x, y in data:
            for m, o in ((ref, ropt), (model, zopt)):
                tiny_gpt.loss_of(m, x, y).backward()
                o.step()
                o.zero_grad()
        got = off.full_parameters()
        for name, p in ref.named_parameters():
            self.assertTrue(torch.equal(got[name], p), name)

    def test_module_without_reset_parameters_is_an_error_naming_it(self):
        import ztier.torch

        class Bare(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.zeros(3))
        with ztier.torch.meta_init():
            model = nn.Sequential(nn.Linear(3, 3), Bare())
        with self.assertRaises(RuntimeError) as cm:
            ztier.torch.offload(model, config(model, tmpdir(self)))
        self.assertIn("'1' (Bare)", str(cm.exception))
        self.assertIn("init=", str(cm.exception))

    def test_weights_streamed_from_a_state_dict_file(self):
        import tiny_gpt
        import ztier.torch
        torch.manual_seed(11)
        ref = tiny_gpt.TinyGPT()
        path = os.path.join(tmpdir(self), "model.pt")
        torch.save(ref.state_dict(), path)
        with ztier.torch.meta_init():
            model = tiny_gpt.TinyGPT()
        off = ztier.torch.offload(model, config(model, tmpdir(self)), weights=path)
        self.addCleanup(off.close)
        got = off.full_parameters()
        for name, p in ref.named_parameters():
            self.assertTrue(torch.equal(got[name], p), name)
        # A file for another model: the missing name is named.
        torch.save({"other.weight": torch.zeros(2)}, path)
        with ztier.torch.meta_init():
            model2 = tiny_gpt.TinyGPT()
        with self.assertRaises(ValueError) as cm:
            ztier.torch.offload(model2, config(model2, tmpdir(self)), weights=path)
        self.assertIn("wte.weight", str(cm.exception))

    # ------------------------------------------------------------ precision
    def low_precision_case(self, dtype, scaler=None, clip=None, steps=4):
        """ztier vs torch's fp32-master loop over a model with `dtype` weights."""
        import ztier.torch
        torch.manual_seed(0)
        ref = Fp32Compute(dtype)
        model = copy.deepcopy(ref)
        masters = [p.detach().float().clone().requires_grad_(True) for p in ref.parameters()]
        ropt = torch.optim.AdamW(masters, lr=1e-2)
        off = ztier.torch.offload(model, config(model, tmpdir(self)))
        self.addCleanup(off.close)
        zopt = off.adamw(lr=1e-2)
        zscaler = ztier.torch.LossScaler(**scaler) if scaler is not None else None
        scale = torch.tensor(float(scaler["init_scale"])) if scaler else None
        g = torch.Generator().manual_seed(1)
        skipped = []
        for step in range(steps):
            x = torch.randn(4, 8, generator=g)
            # torch: scale, backward into dtype grads, fp32 master grads, unscale, clip, step.
            loss = ref(x).pow(2).mean()
            (loss * scale if scale is not None else loss).backward()
            for m, p in zip(masters, ref.parameters()):
                m.grad = p.grad.float()
                p.grad = None
            found_inf = False
            if scale is not None:
                inv = scale.double().reciprocal().float()
                for m in masters:
                    m.grad.mul_(inv)
                found_inf = not all(torch.isfinite(m.grad).all() for m in masters)
            if clip is not None and not found_inf:
                torch.nn.utils.clip_grad_norm_(masters, clip)
            if not found_inf:
                ropt.step()
            ropt.zero_grad()
            with torch.no_grad():
                for m, p in zip(masters, ref.parameters()):
                    p.copy_(m)
            if scale is not None and found_inf:
                scale = scale * scaler["backoff_factor"]
            skipped.append(found_inf)
            # ztier
            zloss = model(x).pow(2).mean()
            self.assertEqual(zloss.item(), loss.item(), f"step {step}")
            if zscaler is not None:
                zscaler.scale(zloss).backward()
                zscaler.unscale_(zopt)
                if clip is not None:
                    zopt.clip_grad_norm_(clip)
                zscaler.step(zopt)
                zscaler.update()
            else:
                zloss.backward()
                if clip is not None:
                    zopt.clip_grad_norm_(clip)
                zopt.step()
            zopt.zero_grad()
        got = off.full_parameters()
        return ref, masters, ropt, zopt, off, got, skipped

    def test_bf16_and_fp16_parameters_equal_torch_fp32_master_loop(self):
        for dtype in (torch.bfloat16, torch.float16):
            with self.subTest(dtype=dtype):
                ref, masters, ropt, zopt, off, got, _ = self.low_precision_case(dtype)
                for (name, p), m in zip(ref.named_parameters(), masters):
                    self.assertEqual(got[name].dtype, dtype)
                    self.assertTrue(torch.equal(got[name], p), name)
                    self.assertTrue(torch.equal(zopt.state_of(off.model.get_parameter(name))
                                                ["master"][:m.numel()], m.detach().flatten()))

    def test_loss_scaling_skips_nonfinite_steps_as_grad_scaler(self):
        # 2**127 overflows the float32 loss: the first step is skipped and
        # the scale backs off (by 2**-20 here) until the gradients are finite.
        ref, masters, _, _, _, got, skipped = self.low_precision_case(
            torch.bfloat16, scaler=dict(init_scale=2.0 ** 127, backoff_factor=2.0 ** -20),
            steps=6)
        self.assertTrue(skipped[0])
        self.assertFalse(skipped[-1])
        for (name, p) in ref.named_parameters():
            self.assertTrue(torch.equal(got[name], p), name)

    def test_clipping_equals_torch_clip_grad_norm(self):
        ref, masters, ropt, zopt, off, got, _ = self.low_precision_case(
            torch.bfloat16, clip=0.05)
        for (name, p), m in zip(ref.named_parameters(), masters):
            state = zopt.state_of(off.model.get_parameter(name))
            torch.testing.assert_close(state["exp_avg"][:m.numel()],
                                       ropt.state[m]["exp_avg"].flatten(), rtol=1e-5, atol=0)
            torch.testing.assert_close(state["master"][:m.numel()], m.detach().flatten(),
                                       rtol=1e-5, atol=0)

    def test_clip_returns_torch_norm_and_accumulates_on_nvme(self):
        import tiny_gpt
        import ztier.torch
        torch.manual_seed(0)
        ref = tiny_gpt.TinyGPT()
        model = copy.deepcopy(ref)
        off = ztier.torch.offload(model, config(model, tmpdir(self)))
        self.addCleanup(off.close)
        zopt = off.adamw(lr=1e-2)
        self.assertTrue(off.engine.grad_stats().on_nvme)
        x, y = next(tiny_gpt.batches(1))
        for half in (slice(0, 4), slice(4, 8)):  # two micro-batches
            tiny_gpt.loss_of(ref, x[half], y[half]).backward()
            tiny_gpt.loss_of(model, x[half], y[half]).backward()
        self.assertTrue(all(p.grad is None for p in model.parameters()))  # streamed
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
        got = zopt.clip_grad_norm_(1e9)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for name, p in ref.named_parameters():  # accumulated on NVMe: the same bits
            buf = torch.empty(p.numel())
            off.engine.grad_partition_read(off.slot_of(model.get_parameter(name)).pid, buf)
            self.assertTrue(torch.equal(buf, p.grad.flatten()), name)

    # ------------------------------------------------------------ ranks
    def test_world_2_gradients_on_nvme(self):
        import tiny_gpt
        import ztier.torch
        torch.manual_seed(0)
        init = tiny_gpt.TinyGPT()
        data = list(tiny_gpt.batches(3, batch=8))
        ref = copy.deepcopy(init)
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        for x, y in data:
            tiny_gpt.loss_of(ref, x, y).backward()
            ropt.step()
            ropt.zero_grad()
        models = [copy.deepcopy(init) for _ in range(2)]
        base = tmpdir(self)
        out = {}

        def rank_main(rank, group):
            model = models[rank]
            off = ztier.torch.offload(model, config(model, base), rank=rank, world_size=2,
                                      local_group=group)
            try:
                opt = off.adamw(lr=1e-2)
                for x, y in data:
                    half = slice(4 * rank, 4 * rank + 4)
                    tiny_gpt.loss_of(model, x[half], y[half]).backward()
                    opt.step()
                    opt.zero_grad()
                if rank == 0:
                    out["grads_on_nvme"] = off.engine.grad_stats().on_nvme
                out[rank] = {}
                for name, p in model.named_parameters():
                    slot = off.slot_of(p)
                    info = off.engine.param_info(slot.pid)
                    buf = torch.empty(info.partition_numel)
                    off.engine.partition_read(slot.pid, buf)
                    out[rank][name] = buf
            finally:
                off.close()
        run_ranks(2, rank_main)
        self.assertTrue(out["grads_on_nvme"])
        for name, p in ref.named_parameters():
            whole = torch.cat([out[0][name], out[1][name]])[:p.numel()]
            want = p.detach().flatten()
            if name.endswith("qkv.bias"):
                # The key bias's gradient is zero up to rounding (softmax does
                # not see a shift of every score in a row): Adam turns that
                # noise into full-size steps whose sign depends on summation
                # order. The query and value biases are compared.
                keep = torch.ones_like(want, dtype=torch.bool)
                keep[32:64] = False
                whole, want = whole[keep], want[keep]
            torch.testing.assert_close(whole, want, rtol=1e-4, atol=1e-6, msg=name)

    # ------------------------------------------------------------ memory
    def test_peak_rss_flat_across_three_sizes(self):
        # One GPT family at three depths (3x the parameters), the same pools
        # (sized for the largest), each in its own process: ztier's peak RSS may not grow
        # by more than 15% from the smallest to the largest, and stays
        # within its pools + live window + activations + a fixed margin.
        import ztier.torch
        import train_large
        path = tmpdir(self)
        # (Each large enough to cycle through every swap and optimizer
        # buffer: a pool a model never fills is memory it never touches.)
        shapes = [(256, 8, 4), (256, 16, 4), (256, 32, 4)]
        pools = shapes[-1]
        rss = []
        for dim, layers, heads in shapes:
            cmd = [sys.executable, os.path.join(ROOT, "scripts", "train_large.py"),
                   "--shape", f"{dim},{layers},{heads}", "--vocab", "8192", "--dir", path,
                   "--steps", "2", "--tokens", "32", "--threads", "1", "--child-json",
                   "--no-summary",
                   # Sub-groups small enough that even the smallest model has
                   # more than the 4 buffers (the pool holds min(4, groups)).
                   "--sub-group", "5e5",
                   "--pools-for", ",".join(map(str, pools))]
            r = subprocess.run(cmd, capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            self.assertLess(row["steps"][-1]["loss"], row["steps"][0]["loss"])
            rss.append(row["peak_rss"])
        params = [train_large.param_count(d, l, vocab=8192) for d, l, _ in shapes]
        print(f"\npeak RSS for {[f'{p / 1e6:.1f}M' for p in params]} parameters: "
              f"{[f'{r / 2**20:.0f} MiB' for r in rss]}")
        self.assertGreater(params[-1], 3 * params[0])
        self.assertLessEqual(rss[-1], 1.15 * rss[0])
        train_large.VOCAB = 8192
        with ztier.torch.meta_init():
            largest = train_large.GPT(*pools)
        est = ztier.torch.memory_estimate(largest, sub_group_size=5e5)["total"]
        baseline = 600 << 20  # the interpreter with torch and ztier loaded, and slack
        self.assertLessEqual(max(rss), est + baseline, f"estimate {est / 2**20:.0f} MiB")

    def test_check_memory_names_the_items(self):
        import ztier.torch
        with ztier.torch.meta_init():
            model = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 4096))
        est = ztier.torch.check_memory(model, 1 << 40)
        self.assertGreater(est["swap_buffers"], 0)
        with self.assertRaises(ValueError) as cm:
            ztier.torch.check_memory(model, 1 << 20)
        self.assertIn("swap_buffers", str(cm.exception))
        self.assertIn("ztier plan", str(cm.exception))
        with self.assertRaises(ValueError):  # the same check through model_config
            ztier.torch.model_config(model, "/nonexistent", memory_limit=1 << 20)
        self.assertIn("tiers:", ztier.torch.model_config(model, "/x", memory_limit=1 << 40))


if __name__ == "__main__":
    unittest.main()
