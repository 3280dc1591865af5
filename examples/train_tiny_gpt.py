#!/usr/bin/env python3
"""Trains a tiny GPT (tied embeddings) with every parameter on NVMe via ztier.

    PYTHONPATH=python /usr/bin/python3 examples/train_tiny_gpt.py [nvme_dir]

Between uses each weight exists only in the swap file: ztier fetches it around
each module's forward and backward. The optimizer is ztier's AdamW: its state
(fp32 master weights and both moments) lives on NVMe too, and each step
streams it through in sub-groups.
"""
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F

import ztier.torch

V, C, H, L, T = 64, 32, 4, 2, 16  # vocab, width, heads, layers, context


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, H, C // H).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln_f, self.head = nn.LayerNorm(C), nn.Linear(C, V, bias=False)
        self.head.weight = self.wte.weight  # tied: fetched by both modules

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


CONFIG = """
tiers:
  params: nvme
  host: {{pin_memory: false}}
  nvme: {{paths: ["{path}"], buffer_count: 8, buffer_size: 8192, buffer_element_bytes: 4}}
coordinator: {{param_persistence_threshold: 0, max_reuse_distance: 0}}
optimizer: {{sub_group_size: 8192, buffer_count: 2}}
"""

torch.manual_seed(0)
model = TinyGPT()
off = ztier.torch.offload(model, CONFIG.format(path=(sys.argv[1:] or ["ztier_nvme"])[0]))
opt = off.adamw(lr=1e-2, weight_decay=0.1)
print(off.engine.describe())
for step in range(20):
    x = torch.randint(0, V, (8, T))
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, V), ((x * 3 + 1) % V).reshape(-1))
    loss.backward()
    opt.step()  # gradients to ztier, the pipelined optimizer step, step end
    opt.zero_grad()
    print(f"step {step:2d} loss {loss.item():.4f}")
s = off.engine.stats()
print(f"nvme reads {s['nvme_reads']} ({s['nvme_bytes_read']} B), "
      f"written {s['nvme_bytes_written']} B, prefetched {s['prefetch_gathers']}")
o = opt.stats()
print(f"optimizer: step {o['step']}, {o['sub_groups']} sub-groups, last step read "
      f"{o['bytes_read']} B and wrote {o['bytes_written']} B of state in {o['step_s'] * 1e3:.2f} ms")
off.close()
