#!/usr/bin/python3
"""Trains a GPT larger than host memory allows for plain torch, with every
parameter, gradient and AdamW state on NVMe, and reports peak memory.

    # GPT-2-XL shape (1.56B parameters), 3 steps, state under /nvme/zt:
    PYTHONPATH=python /usr/bin/python3 scripts/train_large.py --size gpt2-xl --dir /nvme/zt

    # peak RSS against model size, ztier and plain torch, then the plot:
    PYTHONPATH=python /usr/bin/python3 scripts/train_large.py --sweep \\
        xl-4,xl-12,xl-24,gpt2-xl --dir /nvme/zt --json rss.json
    /usr/bin/python3 scripts/plot.py rss rss.json -o rss.png

One run: the model is built under ztier.torch.meta_init() (no parameter
memory), materialised and registered module by module by offload() (its own
GPT-2's init, std 0.02), trained with ztier's AdamW on one fixed batch (so the
loss must fall), gradients streamed to NVMe during backward. Before the
run, the free space under --dir is checked against what the run writes.

Printed per step: loss, step time, its forward+backward and optimizer parts,
NVMe bytes moved; at the end the peak RSS (VmHWM), and the step time against

    compute  forward+backward of the same shape with its weights in memory
             (a 1-block model, plus layers - 1 times one block alone, timed
             in a child process), and
    drive    the step's NVMe bytes over the drive's bandwidth (`ztier bench
             io`, sequential 1 MiB, measured in the same run):
    ratio  = median step / max(compute, drive).

--save-cost ROUNDS measures what a checkpoint costs the step: ROUNDS of
three steps, after no save, a background save and a blocking save
(Offload.save_checkpoint), medians of each.

--sweep runs each size in a child process, ztier and plain torch (torch
only where its 16 bytes per parameter of model state fit in RAM), all
ztier runs with the same pools (sized for the largest model of the sweep).
Exit status: 0, 2 for bad arguments or too little disk, 1 for a failed run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from torch import nn  # noqa: E402

import bench_torch_step  # noqa: E402  (the GPT family; scripts/ is on sys.path)
from bench_torch_step import Block  # noqa: E402

# GPT-2 shapes: (dim, layers, heads); vocab 50257, context 1024.
SIZES = {
    "gpt2": (768, 12, 12),          # 124M
    "gpt2-medium": (1024, 24, 16),  # 355M
    "gpt2-large": (1280, 36, 20),   # 774M
    "gpt2-xl": (1600, 48, 25),      # 1.56B
    # GPT-2-XL's width at fewer layers: one family whose largest parameter
    # (the 50257 x 1600 embedding) stays the same while the size grows.
    "xl-4": (1600, 4, 25),          # 205M
    "xl-12": (1600, 12, 25),        # 451M
    "xl-24": (1600, 24, 25),        # 820M
    "tiny": (128, 2, 4),            # for tests
}
VOCAB, CONTEXT = 50257, 1024  # --vocab overrides VOCAB (tests use small models)
GIB = 1 << 30


CHECKPOINT = True  # --no-checkpoint turns it off


def GPT(dim: int, layers: int, heads: int, vocab: int = None, context: int = CONTEXT):
    """bench_torch_step's GPT (tied embeddings, pre-norm blocks) in this
    script's argument order; vocab defaults to VOCAB (--vocab); activation
    checkpointing per block unless --no-checkpoint (activations would
    otherwise grow with depth x width, as they do without ztier)."""
    model = bench_torch_step.GPT(vocab or VOCAB, dim, layers, heads, context)
    model.checkpoint = CHECKPOINT
    return model


def gpt2_init(module: nn.Module) -> None:
    """GPT-2's initialisation, one module at a time (offload(init=...))."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def param_count(dim, layers, vocab=None, context=CONTEXT) -> int:
    vocab = vocab or VOCAB
    block = 12 * dim * dim + 13 * dim
    return layers * block + vocab * dim + context * dim + 2 * dim


def shape_of(args, size=None):
    """(dim, layers, heads) of --shape, else of the named size."""
    if size is None and args.shape:
        return tuple(int(v) for v in args.shape.split(","))
    return SIZES[size or args.size]


def label(args) -> str:
    return f"GPT {args.shape}" if args.shape else args.size


def batch(args):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (args.batch, args.tokens + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def loss_of(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def peak_rss() -> int:
    """Bytes: this process's peak resident set (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def disk_needed(params: int) -> int:
    """Bytes a run writes under --dir: fp32 parameters (4), gradients (4),
    optimizer state in two slots (2 x 12), and 5% for alignment."""
    return int(params * (4 + 4 + 24) * 1.05)


def check_disk(path: str, params: int, extra: int = 0) -> None:
    """Exits (status 2) unless the run's bytes and `extra` more fit."""
    os.makedirs(path, exist_ok=True)
    need, free = disk_needed(params) + extra, shutil.disk_usage(path).free
    print(f"disk: this run writes {need / GIB:.1f} GiB under {path}; {free / GIB:.1f} GiB free",
          flush=True)
    if free < need:
        print(f"error: not enough free space under {path}: {need / GIB:.1f} GiB needed, "
              f"{free / GIB:.1f} GiB free. Point --dir at a larger drive or pick a smaller "
              "--size", file=sys.stderr)
        sys.exit(2)


def ztier_config(args, model):
    import ztier.torch
    shape = None
    if args.pools_for:
        shape = tuple(int(v) for v in args.pools_for.split(",")) if "," in args.pools_for \
            else SIZES[args.pools_for]
    if shape:  # pools of the largest model of a sweep: the same for every size
        with ztier.torch.meta_init():
            model = GPT(*shape)
    return ztier.torch.model_config(model, args.dir, buffer_count=args.buffers,
                                    sub_group_size=args.sub_group)


def remove_store_files(path: str) -> int:
    """Deletes the run's swap files (ztier-<tag>-rank<r>-of<w>.swp); bytes freed."""
    freed = 0
    for name in os.listdir(path):
        if name.startswith("ztier-") and name.endswith(".swp") and "-rank" in name:
            f = os.path.join(path, name)
            freed += os.path.getsize(f)
            os.remove(f)
    return freed


def drive_bandwidth(path: str) -> tuple:
    """(read, write) bytes/s: `ztier bench io`, sequential 1 MiB, 1 GiB file."""
    exe = os.environ.get("ZTIER_BIN", os.path.join(ROOT, "build", "ztier"))
    out = {}
    f = os.path.join(path, "train_large_io.dat")
    for rw in ("write", "read"):
        r = subprocess.run([exe, "bench", "io", "--rw", rw, "--bs", "1MiB", "--qd", "32",
                            "--size", "1GiB", "--file", f, "--json"], capture_output=True,
                           text=True, check=True)
        out[rw] = json.loads(r.stdout)["bw_bytes_per_s"]
    os.remove(f)
    return out["read"], out["write"]


def compute_time(args) -> float:
    """Seconds of forward+backward of the model's shape, weights in memory,
    measured in a child process (its memory is not this run's): a 1-block
    model whole, plus (layers - 1) x one block's forward+backward alone."""
    dim, layers, heads = shape_of(args)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-compute",
                        "--size", args.size, "--shape", f"{dim},{layers},{heads}",
                        "--vocab", str(VOCAB), "--tokens", str(args.tokens),
                        "--batch", str(args.batch), "--threads", str(args.threads)]
                       + (["--no-checkpoint"] if args.no_checkpoint else []),
                       capture_output=True, text=True, check=True)
    whole, block = json.loads(r.stdout.strip().splitlines()[-1])
    return whole + (layers - 1) * block


def measure_compute(args) -> None:
    """Prints [1-block model fwd+bwd, one block fwd+bwd] in seconds, medians
    of 5 after a warm-up."""
    dim, _, heads = shape_of(args)
    x, y = batch(args)

    def median_of(fn, runs=6):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    model = GPT(dim, 1, heads)

    def whole():
        loss_of(model, x, y).backward()
        model.zero_grad(set_to_none=True)
    t_whole = median_of(whole)
    del model
    block = Block(dim, heads)
    h = torch.randn(args.batch, args.tokens, dim, requires_grad=True)

    def one_block():
        out = (torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if CHECKPOINT
               else block(h))
        out.sum().backward()
        block.zero_grad(set_to_none=True)
        h.grad = None
    print(json.dumps([t_whole, median_of(one_block)]))


def run_ztier(args) -> dict:
    import ztier.torch
    dim, layers, heads = shape_of(args)
    check_disk(args.dir, param_count(dim, layers))
    x, y = batch(args)
    t0 = time.perf_counter()
    with ztier.torch.meta_init():
        model = GPT(dim, layers, heads)
    off = ztier.torch.offload(model, ztier_config(args, model), init=gpt2_init)
    opt = off.adamw(lr=args.lr, weight_decay=0.0)
    setup_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(f"{label(args)}: {params / 1e9:.3f}B parameters offloaded in {setup_s:.1f} s, "
          f"peak RSS so far {peak_rss() / GIB:.2f} GiB", flush=True)
    steps = []
    for step in range(args.steps):
        s0, o0 = off.engine.stats(), opt.stats()
        t0 = time.perf_counter()
        loss = loss_of(model, x, y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        s1, o1 = off.engine.stats(), opt.stats()
        row = dict(step=step, loss=loss.item(), step_s=t2 - t0, fwd_bwd_s=t1 - t0,
                   optimizer_s=t2 - t1,
                   read_bytes=s1["nvme_bytes_read"] - s0["nvme_bytes_read"] + o1["bytes_read"],
                   write_bytes=s1["nvme_bytes_written"] - s0["nvme_bytes_written"]
                   + o1["bytes_written"],
                   rss=peak_rss())
        steps.append(row)
        print(f"step {step}: loss {row['loss']:.4f}  {row['step_s']:.1f} s (forward+backward "
              f"{row['fwd_bwd_s']:.1f} s, optimizer {row['optimizer_s']:.1f} s)  NVMe "
              f"{row['read_bytes'] / 1e9:.1f} GB read, {row['write_bytes'] / 1e9:.1f} GB "
              f"written  peak RSS {row['rss'] / GIB:.2f} GiB", flush=True)
    off.close()
    if not args.keep:
        removed = remove_store_files(args.dir)
        print(f"removed {removed / GIB:.1f} GiB of swap files from {args.dir} (--keep keeps them)",
              flush=True)
    return dict(mode="ztier", size=label(args), params=params, setup_s=setup_s, steps=steps,
                peak_rss=peak_rss())


def run_save_cost(args) -> dict:
    """The cost of a checkpoint on the training step: rounds of three steps,
    each preceded by no save, a background save (its optimizer state written
    while the step's forward and backward run; the step's optimizer call
    finishes and publishes it) and a blocking save; medians."""
    import ztier.torch
    dim, layers, heads = shape_of(args)
    params = param_count(dim, layers)
    # The run's store, plus two checkpoints (one replaces the other) of
    # 16 bytes per parameter (fp32 weights, master and moments).
    check_disk(args.dir, params, extra=2 * 16 * params)
    x, y = batch(args)
    with ztier.torch.meta_init():
        model = GPT(dim, layers, heads)
    off = ztier.torch.offload(model, ztier_config(args, model), init=gpt2_init)
    opt = off.adamw(lr=args.lr, weight_decay=0.0)
    ckpt = os.path.join(args.dir, "save_cost_ckpt")

    def step() -> float:
        t0 = time.perf_counter()
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # warm-up: first touch of the store and buffers
    rows = {"none": [], "background": [], "blocking": []}
    for r in range(args.save_cost):
        for mode in rows:
            t0 = time.perf_counter()
            if mode != "none":
                off.save_checkpoint(ckpt, opt, extra={"round": r}, background=mode == "background")
            save_s = time.perf_counter() - t0
            step_s = step()
            rows[mode].append(dict(save_call_s=save_s, step_s=step_s, total_s=save_s + step_s))
            print(f"round {r} {mode:>10}: save call {save_s:6.2f} s, then step {step_s:6.2f} s",
                  flush=True)
    summary = ztier.checkpoint_verify(ckpt)
    off.close()
    shutil.rmtree(ckpt, ignore_errors=True)
    if not args.keep:
        remove_store_files(args.dir)
    med = {m: {k: statistics.median(v[k] for v in rows[m]) for k in rows[m][0]} for m in rows}
    base = med["none"]["step_s"]
    print(f"{label(args)}: {params / 1e9:.3f}B parameters, medians of {args.save_cost}:")
    print(f"  step without a save       {base:7.2f} s")
    for m in ("background", "blocking"):
        print(f"  {m + ' save, then step':<25} {med[m]['total_s']:7.2f} s (save call "
              f"{med[m]['save_call_s']:.2f} s, step {med[m]['step_s']:.2f} s): "
              f"+{med[m]['total_s'] - base:.2f} s")
    print(f"  last checkpoint: {summary}")
    return dict(mode="save_cost", size=label(args), params=params, rounds=rows, medians=med)


def run_torch(args) -> dict:
    dim, layers, heads = shape_of(args)
    x, y = batch(args)
    torch.manual_seed(0)
    model = GPT(dim, layers, heads)
    model.apply(gpt2_init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(dict(step=step, loss=loss.item(), step_s=time.perf_counter() - t0,
                          rss=peak_rss()))
        print(f"torch step {step}: loss {loss.item():.4f} {steps[-1]['step_s']:.1f} s peak RSS "
              f"{peak_rss() / GIB:.2f} GiB", flush=True)
    return dict(mode="torch", size=label(args), params=sum(p.numel() for p in model.parameters()),
                steps=steps, peak_rss=peak_rss())


def summarize(args, result: dict) -> None:
    steps = result["steps"][1:] or result["steps"]  # the first records the trace
    step_s = statistics.median(s["step_s"] for s in steps)
    rd = statistics.median(s["read_bytes"] for s in steps)
    wr = statistics.median(s["write_bytes"] for s in steps)
    read_bw, write_bw = drive_bandwidth(args.dir)
    drive = rd / read_bw + wr / write_bw
    compute = compute_time(args)
    losses = [s["loss"] for s in result["steps"]]
    result.update(step_s=step_s, drive_s=drive, compute_s=compute, read_bw=read_bw,
                  write_bw=write_bw, ratio=step_s / max(compute, drive),
                  loss_falls=all(b < a for a, b in zip(losses, losses[1:])))
    print(f"\n{label(args)} ({result['params'] / 1e9:.2f}B): peak RSS "
          f"{result['peak_rss'] / GIB:.2f} GiB; median step {step_s:.1f} s; compute "
          f"{compute:.1f} s; drive {drive:.1f} s ({rd / 1e9:.1f} GB at {read_bw / 1e9:.2f} GB/s "
          f"+ {wr / 1e9:.1f} GB at {write_bw / 1e9:.2f} GB/s); ratio {result['ratio']:.3f}; "
          f"losses {', '.join(f'{v:.4f}' for v in losses)}", flush=True)


def sweep(args) -> list:
    sizes = args.sweep.split(",")
    for s in sizes:
        if s not in SIZES:
            sys.exit(f"error: unknown size {s!r}; one of {', '.join(SIZES)}")
    largest = args.pools_for or max(sizes, key=lambda s: param_count(*SIZES[s][:2]))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for s in sizes:
        base = [sys.executable, os.path.abspath(__file__), "--size", s, "--dir", args.dir,
                "--steps", str(args.steps), "--tokens", str(args.tokens),
                "--batch", str(args.batch), "--threads", str(args.threads), "--child-json"]
        if args.no_checkpoint:
            base.append("--no-checkpoint")
        modes = [("ztier", base + ["--pools-for", largest])]
        state = 16 * param_count(*SIZES[s][:2])
        if state < 0.8 * ram:
            modes.append(("torch", base + ["--torch"]))
        else:
            rows.append(dict(mode="torch", size=s, params=param_count(*SIZES[s][:2]),
                             peak_rss=None, note=f"needs {state / GIB:.0f} GiB of model state, "
                             f"RAM is {ram / GIB:.0f} GiB"))
            print(f"torch {s}: not run ({rows[-1]['note']})", flush=True)
        for mode, cmd in modes:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stdout + r.stderr)
                sys.exit(1)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:5s} {s:12s} {row['params'] / 1e9:5.2f}B  peak RSS "
                  f"{row['peak_rss'] / GIB:6.2f} GiB", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="gpt2-xl", choices=sorted(SIZES))
    ap.add_argument("--dir", default=os.environ.get("ZTIER_NVME_PATH", "ztier_nvme"),
                    help="NVMe directory for parameters, gradients and optimizer state")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="sequence length")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads")
    ap.add_argument("--buffers", type=int, default=4, help="swap buffers")
    ap.add_argument("--sub-group", type=float, default=4e6,
                    help="optimizer sub-group elements")
    ap.add_argument("--shape", help="DIM,LAYERS,HEADS instead of --size")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--pools-for", default=None,
                    help="size the pools for this model, a size or DIM,LAYERS,HEADS (sweeps: "
                    "one pool size for all)")
    ap.add_argument("--torch", action="store_true", help="plain torch, everything in memory")
    ap.add_argument("--no-summary", action="store_true",
                    help="skip the compute and drive measurements after the steps")
    ap.add_argument("--no-checkpoint", action="store_true",
                    help="no activation checkpointing (activations grow with the model)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the swap files under --dir after the run")
    ap.add_argument("--sweep", help="comma-separated sizes: peak RSS of each, ztier and torch")
    ap.add_argument("--save-cost", type=int, metavar="ROUNDS",
                    help="the step-time cost of a checkpoint save, background and blocking "
                         "(ROUNDS of 3 steps, medians); the checkpoint goes under --dir")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--add", action="append", default=[],
                    help="with --sweep: a JSON file of an earlier single run (--json) to "
                    "include as a ztier row (same pools: --pools-for its size)")
    ap.add_argument("--child-json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure-compute", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    globals()["VOCAB"] = args.vocab
    globals()["CHECKPOINT"] = not args.no_checkpoint
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    if args.measure_compute:
        measure_compute(args)
        return 0
    if args.sweep:
        result = sweep(args)
        for path in args.add:
            with open(path) as f:
                result.append(json.load(f))
    elif args.save_cost:
        result = run_save_cost(args)
    elif args.torch:
        result = run_torch(args)
    else:
        result = run_ztier(args)
        if not args.no_summary:
            summarize(args, result)
    if args.child_json:
        print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
