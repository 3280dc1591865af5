#!/usr/bin/env python3
"""Trains torchvision's classification models with every parameter offloaded
by ztier.torch, and again with plain torch, and compares the two runs.

    PYTHONPATH=python /usr/bin/python3 scripts/model_zoo.py            # every model <= 1e8 params
    PYTHONPATH=python /usr/bin/python3 scripts/model_zoo.py --models resnet18,vit_b_16 --steps 3
    ... --max-params 1e9 --json zoo.json                               # the large ones too

Per model: the same initial weights, the same batches (random images at a
reduced size, random labels), the same dropout masks (the seed is set before
each step), `--steps` steps of AdamW (torch.optim.AdamW against ztier's own,
its state on NVMe) in train mode. A model passes when every loss and every
final weight is bit-identical; it is listed with the largest relative loss
difference and the largest weight difference either way. The NVMe files go
under --dir (default: ./ztier_zoo), removed afterwards. Exit status 1 when a
model fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

# Models that need more than the default input size, or other arguments.
_SIZE = {"inception_v3": 299, "maxvit_t": 224, "vit_h_14": 56}
_KWARGS = {"vit_b_16": dict(image_size=64), "vit_b_32": dict(image_size=64),
           "vit_l_16": dict(image_size=64), "vit_l_32": dict(image_size=64),
           "vit_h_14": dict(image_size=56)}


def logits_of(out):
    """The classification logits of a model's output (InceptionOutputs too)."""
    return out.logits if hasattr(out, "logits") else out


def batches(steps: int, size: int, batch: int = 2, classes: int = 1000, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(steps)]


def train(model, opt, data, after_backward=None):
    losses = []
    for step, (x, y) in enumerate(data):
        torch.manual_seed(100 + step)  # the same dropout masks in both runs
        loss = F.cross_entropy(logits_of(model(x)), y)
        loss.backward()
        if after_backward:
            after_backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def compare_model(build, data, path: str, lr: float = 1e-3):
    """Trains `build()` with plain torch and with ztier; returns a dict with
    losses, max relative loss difference, max weight difference, equal."""
    import ztier.torch
    torch.manual_seed(0)
    ref = build()
    init = copy.deepcopy(ref.state_dict())
    ref.train()
    ref_losses = train(ref, torch.optim.AdamW(ref.parameters(), lr=lr), data)
    ref_weights = {n: p.detach().clone() for n, p in ref.named_parameters()}
    del ref

    model = build()
    model.load_state_dict(init)
    model.train()
    off = ztier.torch.offload(model, ztier.torch.model_config(model, path, sub_group_size=1 << 20,
                                                              optimizer_buffers=2))
    try:
        losses = train(model, off.adamw(lr=lr), data)
        weights = off.full_parameters()
        trace = off.engine.stats()["trace_mode"]
    finally:
        off.close()
    rel = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(ref_losses, losses))
    wdiff = max((w - ref_weights[n]).abs().max().item() for n, w in weights.items())
    equal = losses == ref_losses and set(weights) == set(ref_weights) and all(
        torch.equal(w, ref_weights[n]) for n, w in weights.items())
    return dict(ref_losses=ref_losses, losses=losses, max_rel_loss_diff=rel,
                max_weight_diff=wdiff, bit_identical=equal, trace_mode=trace)


def run_zoo(names, steps, size, max_params, base_dir, out=sys.stdout):
    import torchvision.models as tvm
    rows = []
    for name in names:
        kwargs = _KWARGS.get(name, {})
        build = lambda: tvm.get_model(name, weights=None, **kwargs)  # noqa: E731
        row = dict(model=name)
        t0 = time.time()
        try:
            with torch.device("meta") if hasattr(torch, "device") and \
                    hasattr(torch.device, "__enter__") else _nullcontext():
                params = sum(p.numel() for p in build().parameters())
        except Exception:
            params = sum(p.numel() for p in build().parameters())
        row["params"] = params
        if params > max_params:
            row.update(status="skipped", reason=f"{params / 1e6:.0f}M parameters > --max-params")
            rows.append(row)
            print(f"{name:22s} {params / 1e6:8.1f}M  skipped ({row['reason']})", file=out,
                  flush=True)
            continue
        path = tempfile.mkdtemp(prefix=f"{name}_", dir=base_dir)
        try:
            r = compare_model(build, batches(steps, _SIZE.get(name, size)), path)
            row.update(r, status="pass" if r["bit_identical"] else "differs")
        except Exception as e:
            row.update(status="fail", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            traceback.print_exc(file=sys.stderr)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        row["seconds"] = time.time() - t0
        rows.append(row)
        detail = (f"max rel loss diff {row['max_rel_loss_diff']:.2e}, max |w diff| "
                  f"{row['max_weight_diff']:.2e}" if "max_rel_loss_diff" in row
                  else row.get("reason", ""))
        print(f"{name:22s} {params / 1e6:8.1f}M  {row['status']:8s} {detail}  "
              f"({row['seconds']:.1f} s)", file=out, flush=True)
    return rows


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: every classification "
                    "model in torchvision.models)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--max-params", type=float, default=1e8,
                    help="skip larger models (with the reason)")
    ap.add_argument("--dir", default="ztier_zoo", help="where the NVMe files go")
    ap.add_argument("--json", help="write the table as JSON here")
    a = ap.parse_args()
    import torchvision.models as tvm
    names = a.models.split(",") if a.models else tvm.list_models(module=tvm)
    os.makedirs(a.dir, exist_ok=True)
    print(f"torch {torch.__version__}, {len(names)} models, {a.steps} steps, "
          f"input {a.size}x{a.size}, batch 2", flush=True)
    rows = run_zoo(names, a.steps, a.size, a.max_params, a.dir)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "differs", "fail",
                                                               "skipped")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if counts["fail"] or counts["differs"] else 0


if __name__ == "__main__":
    sys.exit(main())
