#!/usr/bin/env python3
"""Step time of ztier.torch on CPU models that fit in memory, against plain
torch and against the drive's bound, measured side by side in one run.

    PYTHONPATH=python /usr/bin/python3 scripts/bench_torch_step.py --model gpt67m --dir /nvme/zt
    ... --model gpt184m | resnet50 | all     --steps 5 --json out.json

For each model: plain torch steps (torch.optim.AdamW, everything in memory)
and ztier steps (every parameter and the AdamW state on NVMe under --dir)
alternate, A B A B, after one warm-up step each, so the machine's drift hits
both alike. The NVMe bytes of each ztier step (parameter reads and writes,
optimizer-state reads and writes) come from the engine's counters; the
drive's sequential read and write bandwidth is measured with `ztier bench
io` on a file in the same directory between the steps. Printed per model:
medians of the step times, the drive time of a step's bytes, and

    ratio = ztier step / max(plain torch step, drive time)

Measure with an optimized BLAS (Debian: libopenblas0-pthread); with the
reference BLAS compute hides every overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    # Activation checkpointing per block (torch.utils.checkpoint): only each
    # block's input is kept for backward, which recomputes the rest.
    checkpoint = False

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            if self.checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_f(x))


def gpt_case(dim, layers, vocab=32000, batch=2, tokens=64):
    def build():
        return GPT(vocab, dim, layers, dim // 64, tokens)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, tokens), generator=g)

    def loss(model):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, vocab), x.roll(-1, 1).reshape(-1))
    return build, loss


def resnet50_case(batch=8, size=128):
    import torchvision
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return (lambda: torchvision.models.resnet50()), lambda m: F.cross_entropy(m(x), y)


CASES = {
    "gpt67m": lambda: gpt_case(768, 6),
    "gpt184m": lambda: gpt_case(1024, 12),
    "resnet50": resnet50_case,
}


def drive_bandwidth(ztier_bin, path, size="1GiB"):
    """(read, write) bytes/s of bench io on a file in `path`."""
    out = {}
    f = os.path.join(path, "bench_torch_io.dat")
    for rw in ("write", "read"):
        r = subprocess.run([ztier_bin, "bench", "io", "--rw", rw, "--bs", "1MiB", "--qd", "32",
                            "--size", size, "--file", f, "--json"], capture_output=True,
                           text=True, check=True)
        out[rw] = json.loads(r.stdout)["bw_bytes_per_s"]
    os.remove(f)
    return out["read"], out["write"]


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name, steps, path, ztier_bin, log, overlap=False):
    import ztier.torch
    build, loss_of = CASES[name]()
    torch.manual_seed(0)
    ref = build()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    params = sum(p.numel() for p in ref.parameters())
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-4)

    model = build()
    model.load_state_dict(init)
    del init
    # overlap begins the step during backward: gradients must stay on the host.
    off = ztier.torch.offload(model, ztier.torch.model_config(
        model, path, buffer_count=6, gradients="host" if overlap else "nvme"))
    zopt = off.adamw(lr=1e-4, overlap=overlap)

    def torch_step():
        loss_of(ref).backward()
        ropt.step()
        ropt.zero_grad(set_to_none=True)

    def ztier_step():
        loss_of(model).backward()
        zopt.step()
        zopt.zero_grad(set_to_none=True)

    def counters():
        s, o = off.engine.stats(), zopt.stats()
        return s["nvme_bytes_read"], s["nvme_bytes_written"], o["bytes_read"], o["bytes_written"]

    torch_step()
    ztier_step()  # warm-up: records the trace
    t_torch, t_ztier, moved = [], [], []
    bws = [drive_bandwidth(ztier_bin, path)]
    for _ in range(steps):
        t_torch.append(timed(torch_step))
        before = counters()
        t_ztier.append(timed(ztier_step))
        after = counters()
        moved.append((after[0] - before[0] + after[2], after[1] - before[1] + after[3]))
    bws.append(drive_bandwidth(ztier_bin, path))
    off.close()
    read_bw = statistics.median(b[0] for b in bws)
    write_bw = statistics.median(b[1] for b in bws)
    rd = statistics.median(m[0] for m in moved)
    wr = statistics.median(m[1] for m in moved)
    drive = rd / read_bw + wr / write_bw
    tt, tz = statistics.median(t_torch), statistics.median(t_ztier)
    row = dict(model=name, params=params, torch_s=tt, ztier_s=tz, read_bytes=rd,
               write_bytes=wr, read_bw=read_bw, write_bw=write_bw, drive_s=drive,
               ratio=tz / max(tt, drive), torch_all=t_torch, ztier_all=t_ztier)
    print(f"{name:9s} {params / 1e6:6.1f}M  torch {tt:6.3f} s  ztier {tz:6.3f} s  "
          f"nvme {rd / 1e9:.2f} GB read + {wr / 1e9:.2f} GB written at {read_bw / 1e9:.2f} / "
          f"{write_bw / 1e9:.2f} GB/s = {drive:.3f} s  ratio {row['ratio']:.3f}", file=log,
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt67m", help=f"{', '.join(CASES)} or all")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dir", default=os.environ.get("ZTIER_NVME_PATH", "ztier_nvme"))
    ap.add_argument("--ztier", default=os.path.join(ROOT, "build", "ztier"))
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch's intra-op threads (default: every core)")
    ap.add_argument("--overlap", action="store_true",
                    help="begin ztier's optimizer step during backward (AdamW overlap=True)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.dir, exist_ok=True)
    names = list(CASES) if a.model == "all" else a.model.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} steps "
          "each (medians)", flush=True)
    rows = []
    for name in names:
        path = tempfile.mkdtemp(prefix=f"bench_{name}_", dir=a.dir)
        try:
            rows.append(bench(name, a.steps, path, a.ztier, sys.stdout, a.overlap))
        finally:
            shutil.rmtree(path, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
