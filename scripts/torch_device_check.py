#!/usr/bin/env python3
"""ztier.torch on a device: a GPT and torchvision's resnet18 trained with
every parameter offloaded (engine device auto: CUDA where there is one) and
with plain torch on the same device, side by side.

    PYTHONPATH=python python3 scripts/torch_device_check.py --dir /nvme/zt [--device cuda]

Prints per model the losses of both runs, the largest relative loss
difference, the median step times, whether the optimizer step overlapped
backward, and the trace mode. Exit status 1 when a loss differs by more than
--rtol (CUDA's kernels need not be bit-reproducible across runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)


def cases(device):
    import bench_torch_step as b
    build, _ = b.gpt_case(256, 4, vocab=4096, batch=4, tokens=64)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4096, (4, 64), generator=g).to(device)

    def gpt_loss(model):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, 4096), x.roll(-1, 1).reshape(-1))
    yield "gpt", build, gpt_loss
    try:
        import torchvision
    except ImportError:
        return
    img = torch.randn(8, 3, 64, 64, generator=g).to(device)
    lab = torch.randint(0, 1000, (8,), generator=g).to(device)
    yield "resnet18", torchvision.models.resnet18, lambda m: F.cross_entropy(m(img), lab)


def train(model, opt, loss_of, steps, device):
    losses, times = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return losses, times


def main():
    import ztier.torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dir", default=os.environ.get("ZTIER_NVME_PATH", "ztier_nvme"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rtol", type=float, default=1e-4)
    a = ap.parse_args()
    device = torch.device(a.device)
    os.makedirs(a.dir, exist_ok=True)
    print(f"torch {torch.__version__} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    bad = False
    for name, build, loss_of in cases(device):
        torch.manual_seed(0)
        ref = build().to(device)
        init = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        ref_losses, ref_times = train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3),
                                      loss_of, a.steps, device)
        model = build().to(device)
        model.load_state_dict(init)
        path = tempfile.mkdtemp(prefix=f"{name}_", dir=a.dir)
        # Gradients on the host: the optimizer step may begin during backward.
        off = ztier.torch.offload(model, ztier.torch.model_config(model, path, gradients="host"))
        opt = off.adamw(lr=1e-3)
        losses, times = train(model, opt, loss_of, a.steps, device)
        stats = off.engine.stats()
        kind, ordinal = off.engine.device()
        off.close()
        rel = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(ref_losses, losses))
        bad |= rel > a.rtol
        print(f"{name}: ztier device {kind.name.lower()}" + (f":{ordinal}" if ordinal >= 0 else ""))
        print(f"  losses torch {['%.6f' % v for v in ref_losses]}")
        print(f"  losses ztier {['%.6f' % v for v in losses]}  max rel diff {rel:.2e}")
        print(f"  step s (median after the first) torch {statistics.median(ref_times[1:]):.4f} "
              f"ztier {statistics.median(times[1:]):.4f}; overlapped {opt.last_step_overlapped}; "
              f"trace mode {stats['trace_mode']} (1 = COMPLETE)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
