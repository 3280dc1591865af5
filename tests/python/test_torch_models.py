"""ztier.torch trains unmodified stock models bit-identically to plain torch.

Each case builds a model twice from the same weights, trains it with plain
torch and with every parameter offloaded (world 1, parameters and AdamW
state on NVMe), and compares every loss and every final weight bit for bit:
torchvision CNNs with in-place ReLUs and BatchNorm, a Vision Transformer
(nn.MultiheadAttention reads out_proj's weight itself), nn.Transformer
encoder/decoder and MultiheadAttention variants, a torchaudio Conformer,
activation checkpointing (reentrant and not) with the trace staying
COMPLETE, gradient accumulation, parameter groups with an lr scheduler,
frozen parameters, parameters without a gradient in some steps, a module
called twice per forward, weight_norm and parametrizations, outputs of any
structure modified in place, inference under no_grad, and the errors for a
parameter used outside the model's forward. scripts/model_zoo.py runs the
whole torchvision zoo the same way. Skips, saying why, without torch.
"""

import copy
import dataclasses
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from torch_testing import TORCH_MISSING, run_ranks, tmpdir, torch  # noqa: E402

if torch is not None:
    from torch import nn
    import torch.nn.functional as F


def config_for(model, path, gradients="nvme", **coordinator):
    import ztier.torch
    return ztier.torch.model_config(model, path, sub_group_size=3000, optimizer_buffers=2,
                                    gradients=gradients, coordinator=coordinator)


@unittest.skipIf(torch is None, TORCH_MISSING)
class ModelsTest(unittest.TestCase):
    # ---------------------------------------------------------------- harness
    def pair(self, build, loss_of, steps=3, make_opt=None, lr=1e-3, before_step=None,
             train=True, coordinator=None, after_offload=None):
        """Trains build() with plain torch and offloaded; asserts bit-identical
        losses and weights; returns (losses, engine stats, the Offload, weights)."""
        import ztier.torch
        make_opt = make_opt or (lambda model, make: (make(lr=lr), None))
        torch.manual_seed(0)
        ref = build()
        init = copy.deepcopy(ref.state_dict())

        def loop(model, opt, sched):
            model.train(train)
            losses = []
            for step in range(steps):
                torch.manual_seed(100 + step)
                loss = loss_of(model, step)
                loss.backward()
                if before_step:
                    before_step(model, step)
                opt.step()
                if sched:
                    sched.step()
                opt.zero_grad()
                losses.append(loss.item())
            return losses

        opt, sched = make_opt(ref, lambda params=None, **kw: torch.optim.AdamW(
            params if params is not None else [p for p in ref.parameters() if p.requires_grad],
            **kw))
        ref_losses = loop(ref, opt, sched)
        ref_weights = {n: p.detach().clone() for n, p in ref.named_parameters()}

        model = build()
        model.load_state_dict(init)
        off = ztier.torch.offload(model, config_for(model, tmpdir(self, "ztier_models_"),
                                                     **(coordinator or {})))
        self.addCleanup(off.close)
        if after_offload:
            after_offload(off, model)
        opt, sched = make_opt(model, lambda params=None, **kw: off.adamw(params, **kw))
        losses = loop(model, opt, sched)
        weights = off.full_parameters()
        stats = off.engine.stats()
        self.assertEqual(losses, ref_losses)
        self.assertEqual(set(weights), set(ref_weights))
        for name, w in weights.items():
            self.assertTrue(torch.equal(w, ref_weights[name]),
                            f"{name}: max diff {(w - ref_weights[name]).abs().max()}")
        self.assertHolds(off)
        return losses, stats, off, weights

    def assertHolds(self, off):
        """Between steps ztier.torch holds no parameter: each is empty, and
        once the engine frees what its rules keep (persistent ones), nothing
        is live."""
        for name, p in off.model.named_parameters():
            self.assertEqual(p.data.numel(), 0, name)
        off.engine.release_all(True)
        self.assertEqual(off.engine.stats()["live_numel"], 0)

    # ---------------------------------------------------------------- torchvision
    def torchvision_case(self, name, size=32, **kwargs):
        try:
            import torchvision.models as tvm
        except ImportError as e:
            self.skipTest(f"torchvision is not importable ({e}); install python3-torchvision")
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(2, 3, size, size, generator=g), torch.randint(0, 10, (2,),
                                                                           generator=g))
                for _ in range(3)]

        def loss_of(model, step):
            out = model(data[step][0])
            out = out.logits if hasattr(out, "logits") else out
            return F.cross_entropy(out, data[step][1])
        return self.pair(lambda: tvm.get_model(name, weights=None, num_classes=10, **kwargs),
                         loss_of)

    def test_resnet18_inplace_relu_batchnorm(self):
        _, stats, _, _ = self.torchvision_case("resnet18")
        self.assertGreater(stats["nvme_reads"], 0)

    def test_mobilenet_v3_small(self):
        self.torchvision_case("mobilenet_v3_small")

    def test_densenet121(self):
        self.torchvision_case("densenet121")

    def test_googlenet_aux_outputs_without_gradient(self):
        # The auxiliary classifiers run but their outputs are unused: their
        # parameters get no gradient, and AdamW leaves them (torch's too).
        self.torchvision_case("googlenet", size=64, aux_logits=True, init_weights=False)

    def test_vision_transformer(self):
        try:
            from torchvision.models import VisionTransformer
        except ImportError as e:
            self.skipTest(f"torchvision is not importable ({e})")
        x = torch.randn(2, 3, 32, 32)

        def loss_of(model, step):
            return model(x * (step + 1)).logsumexp(-1).mean()
        self.pair(lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                            num_heads=2, hidden_dim=32, mlp_dim=64,
                                            num_classes=10), loss_of)

    # ---------------------------------------------------------------- transformers
    def test_transformer_encoder_decoder(self):
        for batch_first, norm_first in ((True, False), (False, True)):
            with self.subTest(batch_first=batch_first, norm_first=norm_first):
                src = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
                tgt = torch.randn(2, 4, 16) if batch_first else torch.randn(4, 2, 16)

                def build():
                    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2,
                                          num_decoder_layers=2, dim_feedforward=32,
                                          dropout=0.1, batch_first=batch_first,
                                          norm_first=norm_first)
                mask = nn.Transformer.generate_square_subsequent_mask(4)
                self.pair(build, lambda m, step: m(src, tgt, tgt_mask=mask).pow(2).mean())

    def test_multihead_attention_variants(self):
        class Attn(nn.Module):
            def __init__(self, **kw):
                super().__init__()
                self.q = nn.Linear(8, 16)
                self.attn = nn.MultiheadAttention(16, 4, **kw)

            def forward(self, x, kv):
                out, weights = self.attn(self.q(x), kv, kv, need_weights=True)
                return out.sum() + weights.sum()

        variants = [dict(batch_first=True), dict(kdim=6, vdim=6),
                    dict(add_bias_kv=True, add_zero_attn=True), dict(bias=False)]
        for kw in variants:
            with self.subTest(**kw):
                bf = kw.get("batch_first", False)
                x = torch.randn(2, 3, 8) if bf else torch.randn(3, 2, 8)
                kvdim = kw.get("kdim", 16)
                kv = torch.randn(2, 4, kvdim) if bf else torch.randn(4, 2, kvdim)
                self.pair(lambda: Attn(**kw), lambda m, step: m(x, kv))

    def test_torchaudio_conformer(self):
        try:
            import torchaudio
        except ImportError as e:
            self.skipTest(f"torchaudio is not importable ({e}); install python3-torchaudio")
        x = torch.randn(2, 12, 16)
        lengths = torch.tensor([12, 9])

        def loss_of(model, step):
            out, _ = model(x + step, lengths)
            return out.pow(2).mean()
        self.pair(lambda: torchaudio.models.Conformer(input_dim=16, num_heads=2, ffn_dim=32,
                                                       num_layers=2,
                                                       depthwise_conv_kernel_size=3), loss_of)

    # ---------------------------------------------------------------- training patterns
    def gpt_case(self, **kwargs):
        import tiny_gpt
        data = list(tiny_gpt.batches(4))
        return lambda m, step: tiny_gpt.loss_of(m, *data[step % len(data)]), \
            lambda: tiny_gpt.TinyGPT(**kwargs)

    def test_activation_checkpointing_keeps_the_trace_complete(self):
        import tiny_gpt
        from torch.utils.checkpoint import checkpoint
        data = list(tiny_gpt.batches(4))
        for reentrant in (True, False):
            with self.subTest(use_reentrant=reentrant):
                class Checkpointed(tiny_gpt.TinyGPT):
                    def forward(self, idx):
                        pos = torch.arange(idx.shape[1])
                        x = self.wte(idx) + self.wpe(pos)
                        for block in self.blocks:
                            x = checkpoint(block, x, use_reentrant=reentrant)
                        return self.head(self.ln_f(x))

                _, stats, _, _ = self.pair(
                    Checkpointed, lambda m, step: tiny_gpt.loss_of(m, *data[step]), steps=4)
                self.assertEqual(stats["trace_mode"], 1, "the trace is COMPLETE")

    def test_gradient_accumulation(self):
        import tiny_gpt
        x, y = next(tiny_gpt.batches(1, batch=8))

        def accumulated(m, step):
            # 4 micro-batches of 2, then one step: the first three backward
            # here, the last one by the caller.
            for k in range(4):
                loss = tiny_gpt.loss_of(m, x[2 * k:2 * k + 2], y[2 * k:2 * k + 2]) / 4
                if k < 3:
                    loss.backward()
            return loss
        self.pair(tiny_gpt.TinyGPT, accumulated)
        # The accumulated gradients ztier hands to its optimizer equal one
        # batch of 8's, up to summation order.
        import ztier.torch
        torch.manual_seed(0)
        ref = tiny_gpt.TinyGPT()
        model = copy.deepcopy(ref)
        tiny_gpt.loss_of(ref, x, y).backward()
        # No optimizer here: gradients in host memory (the NVMe store is the optimizer's).
        off = ztier.torch.offload(model, config_for(model, tmpdir(self, "ztier_models_"),
                                                     gradients="host"))
        self.addCleanup(off.close)
        accumulated(model, 0).backward()
        off.finish_backward()
        for name, p in ref.named_parameters():
            got = torch.empty(p.numel())
            off.engine.grad_partition_read(off.slot_of(dict(model.named_parameters())[name]).pid,
                                           got)
            self.assertTrue(torch.allclose(got, p.grad.flatten(), rtol=1e-5, atol=1e-7), name)

    def test_parameter_groups_and_lr_scheduler(self):
        loss_of, build = self.gpt_case()

        def make_opt(model, make):
            decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
            opt = make([{"params": decay, "weight_decay": 0.1},
                        {"params": no_decay, "weight_decay": 0.0, "lr": 3e-3}], lr=1e-2)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return opt, sched
        self.pair(build, loss_of, steps=4, make_opt=make_opt)

    def test_frozen_parameters(self):
        import ztier
        loss_of, build = self.gpt_case()

        def frozen():
            m = build()
            for p in m.blocks[0].parameters():
                p.requires_grad_(False)
            return m
        _, _, off, _ = self.pair(frozen, loss_of)
        opt_params = off.model.blocks[0].qkv.weight
        with self.assertRaises(ztier.ZtierError) as cm:  # no optimizer state for it
            off.engine.optimizer_state_read(off.slot_of(opt_params).pid,
                                            ztier.StateArray.MASTER,
                                            torch.empty(opt_params.numel()))
        self.assertIn("no optimizer state", str(cm.exception))

    def test_no_gradient_in_some_steps_and_modules_called_twice(self):
        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.shared = nn.Linear(6, 6)
                self.odd = nn.Linear(6, 6)
                self.head = nn.Linear(6, 1)

            def forward(self, x, step):
                h = torch.tanh(self.shared(torch.tanh(self.shared(x))))  # called twice
                if step % 2:
                    h = self.odd(h)  # no gradient on even steps
                return self.head(h).sum()
        x = torch.randn(4, 6)
        self.pair(Branchy, lambda m, step: m(x, step), steps=4)

    def test_weight_norm_and_parametrize(self):
        from torch.nn.utils import parametrize, weight_norm

        class Symmetric(nn.Module):
            def forward(self, w):
                return w.triu() + w.triu(1).transpose(0, 1)

        def build():
            m = nn.Sequential(weight_norm(nn.Linear(5, 5)), nn.ReLU(), nn.Linear(5, 5))
            parametrize.register_parametrization(m[2], "weight", Symmetric())
            return m
        x = torch.randn(3, 5)
        self.pair(build, lambda m, step: m(x).pow(2).sum())

    def test_structured_outputs_modified_in_place(self):
        @dataclasses.dataclass
        class Out:
            hidden: torch.Tensor
            extra: dict

        class Inner(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)
                self.bias = nn.Parameter(torch.randn(4))

            def forward(self, x):
                h = self.lin(x)
                return Out(h, {"b": self.bias, "none": None, "n": 3})  # its own parameter

        class Outer(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = Inner()

            def forward(self, x):
                out = self.inner(x)
                out.hidden.add_(0.5).relu_()  # in place on a hooked output
                return out.hidden * out.extra["b"]
        x = torch.randn(3, 4)
        self.pair(Outer, lambda m, step: m(x).sum())

    def test_overlapped_step_bit_identical_and_redone_when_anything_changed(self):
        # AdamW(overlap=True) begins the step during backward. Every way the
        # trainer can change the step's inputs after backward is checked
        # against plain torch: clipping (gradients modified in place), a new
        # lr set between backward and step, and accumulation over two
        # backward passes after steps of one.
        import tiny_gpt
        data = list(tiny_gpt.batches(8))
        plan = {2: "clip", 3: "lr", 4: "accumulate"}

        def loss_of(m, step):
            if plan.get(step) == "accumulate":
                tiny_gpt.loss_of(m, *data[step - 1]).backward()
            return tiny_gpt.loss_of(m, *data[step])

        def before_step(model, step):
            if plan.get(step) == "clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if plan.get(step) == "lr":
                opt_of[model].param_groups[0]["lr"] = 3e-3

        opt_of = {}

        import ztier.torch
        torch.manual_seed(0)
        ref = tiny_gpt.TinyGPT()
        init = copy.deepcopy(ref.state_dict())
        model = tiny_gpt.TinyGPT()
        model.load_state_dict(init)
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        off = ztier.torch.offload(model, config_for(model, tmpdir(self, "ztier_models_"),
                                                     gradients="host"))
        self.addCleanup(off.close)
        # keep_grads: torch's clip_grad_norm_ edits param.grad after backward.
        zopt = off.adamw(lr=1e-2, overlap=True, keep_grads=True)
        opt_of[ref], opt_of[model] = ropt, zopt
        overlapped = []
        for step in range(len(data)):
            for m, o in ((ref, ropt), (model, zopt)):
                loss = loss_of(m, step)
                loss.backward()
                before_step(m, step)
                o.step()
                o.zero_grad()
                if o is ropt:
                    expected = loss.item()
                else:
                    self.assertEqual(loss.item(), expected, f"step {step}")
            overlapped.append(zopt.last_step_overlapped)
        weights = off.full_parameters()
        for name, p in ref.named_parameters():
            self.assertTrue(torch.equal(weights[name], p), name)
        # Begun early from the second step on; used, except where the
        # trainer changed something after backward (redone whole), and not
        # begun the step after the accumulation (it expects two backward
        # passes, and one comes).
        self.assertEqual(overlapped, [False, True, False, False, False, False, True, True])
        self.assertHolds(off)

    def test_inference_under_no_grad_and_eval(self):
        import ztier.torch
        loss_of, build = self.gpt_case()
        import tiny_gpt
        x, _ = next(tiny_gpt.batches(1))
        torch.manual_seed(0)
        ref = build().eval()
        with torch.no_grad():
            expected = ref(x)
        model = build()
        model.load_state_dict(ref.state_dict())
        off = ztier.torch.offload(model.eval(), config_for(model, tmpdir(self, "ztier_models_")))
        self.addCleanup(off.close)
        for _ in range(2):
            with torch.no_grad():
                self.assertTrue(torch.equal(model(x), expected))
            off.engine.step_end()
        self.assertHolds(off)

    def world2(self, build, loss_of, x, steps=4, lr=1e-3):
        """Trains build() single-process on batch `x` and as two ranks
        (threads, local collective) on half of it each; asserts the mean of
        the ranks' losses within 1e-5 of the single-process loss."""
        import ztier.torch
        ref = build()
        opt = torch.optim.AdamW(ref.parameters(), lr=lr)
        ref_losses = []
        for step in range(steps):
            loss = loss_of(ref, x, step)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ref_losses.append(loss.item())
        path = tmpdir(self, "ztier_models_")
        losses = [[None] * steps for _ in range(2)]
        half = x.shape[0] // 2
        # Built here, one after the other: torch's random generator is one
        # per process, and builds racing on it in the rank threads would give
        # the ranks different initial weights.
        models = [build() for _ in range(2)]

        def rank_main(rank, group):
            model = models[rank]
            off = ztier.torch.offload(model, config_for(model, path), rank=rank,
                                      world_size=2, local_group=group)
            zopt = off.adamw(lr=lr)
            for step in range(steps):
                loss = loss_of(model, x[rank * half:(rank + 1) * half], step)
                loss.backward()
                zopt.step()
                zopt.zero_grad(set_to_none=True)
                losses[rank][step] = loss.item()
            off.close()
        run_ranks(2, rank_main)
        for step, a in enumerate(ref_losses):
            mean = (losses[0][step] + losses[1][step]) / 2
            print(f"world 2 step {step}: reference {a:.9f}, mean of ranks {mean:.9f}, "
                  f"relative diff {abs(a - mean) / abs(a):.2e}")
            self.assertLessEqual(abs(a - mean), 1e-5 * abs(a), f"step {step}")

    def test_world2_transformer_within_1e5_of_the_full_batch(self):
        # The hooks, the saved references and the out_proj touch on each rank.
        def build():
            torch.manual_seed(0)
            return nn.TransformerEncoder(nn.TransformerEncoderLayer(
                16, 2, dim_feedforward=32, dropout=0.0, batch_first=True), num_layers=2)
        self.world2(build, lambda m, xs, step: m(xs).pow(2).mean(), torch.randn(4, 6, 16))

    def test_world2_parameters_without_gradient_on_every_rank_are_skipped(self):
        # On even steps no rank uses `odd`: the ranks agree it has no
        # gradient and skip it, as single-process torch does (zeros would
        # move it by AdamW's momentum).
        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.inp = nn.Linear(6, 6)
                self.odd = nn.Linear(6, 6)
                self.head = nn.Linear(6, 1)

            def forward(self, x, step):
                h = torch.tanh(self.inp(x))
                if step % 2:
                    h = self.odd(h)
                return self.head(h).pow(2).mean()
        self.world2(Branchy, lambda m, xs, step: m(xs, step), torch.randn(4, 6), steps=5,
                    lr=1e-2)

    def test_a_declared_external_parameter(self):
        # A forward that reads another module's weight through .data (no
        # torch call on the parameter: nothing to notice) works once
        # declared, and the module's backward gets it too.
        class Sneaky(nn.Module):
            def __init__(self):
                super().__init__()
                self.used = nn.Linear(4, 4)
                self.other = nn.Linear(4, 4)  # never called

            def forward(self, x):
                return (self.used(x) @ self.other.weight.data.t()).pow(2).sum()
        x = torch.randn(3, 4)
        self.pair(Sneaky, lambda m, step: m(x * (step + 1)),
                  after_offload=lambda off, m: off.register_external_parameter(
                      m, m.other.weight))
        import ztier.torch
        m = Sneaky()
        off = ztier.torch.offload(m, config_for(m, tmpdir(self, "ztier_models_")))
        self.addCleanup(off.close)
        with self.assertRaises(RuntimeError):  # undeclared: an empty weight
            m(x)
        with self.assertRaises(ValueError):
            off.register_external_parameter(nn.Linear(1, 1), m.other.weight)

    def test_a_forward_that_raises_leaves_nothing_held(self):
        # The exception leaves the outer modules fetched and the saved-tensor
        # hooks pushed; the next forward cleans up and trains on, the same
        # as plain torch.
        class Flaky(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(4, 4)
                self.b = nn.Linear(4, 1)
                self.scale = nn.Parameter(torch.ones(1))  # fetched for the whole forward
                self.fail = False

            def forward(self, x):
                h = self.a(x)
                if self.fail:
                    raise ValueError("a bad batch")
                return self.b(torch.relu(h)).sum() * self.scale
        x = torch.randn(3, 4)

        def loss_of(m, step):
            if step == 1:
                m.fail = True
                with self.assertRaises(ValueError):
                    m(x)
                m.fail = False
            return m(x * (step + 1))
        _, _, off, _ = self.pair(Flaky, loss_of)
        self.assertEqual([s.users for s in off._slots], [0] * 5)

    def test_use_outside_the_forward_is_a_clear_error(self):
        import ztier.torch
        model = nn.Sequential(nn.Linear(3, 3))
        off = ztier.torch.offload(model, config_for(model, tmpdir(self, "ztier_models_")))
        self.addCleanup(off.close)
        w = model[0].weight
        self.assertEqual(w.shape, (3, 3))  # the shape still reads as the full shape
        self.assertEqual(sum(p.numel() for p in model.parameters()), 12)
        with self.assertRaises(RuntimeError) as cm:
            (w * 2).sum()
        self.assertIn("'0.weight' [3, 3]", str(cm.exception))
        self.assertIn("outside the forward", str(cm.exception))
        with self.assertRaises(RuntimeError) as cm:
            model.load_state_dict({"0.weight": torch.zeros(3, 3), "0.bias": torch.zeros(3)})
        self.assertIn("'0.weight'", str(cm.exception))
        with self.assertRaises(RuntimeError) as cm:  # it would copy empty weights
            copy.deepcopy(model)
        self.assertIn("__deepcopy__", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
