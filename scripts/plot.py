#!/usr/bin/python3
"""Plots of ztier benchmark results (matplotlib, PNG).

  plot.py sweep SWEEP.json -o sweep.png
      `ztier bench sweep` results: bandwidth against block size, one panel
      per backend, one line per queue depth (best over thread counts).
  plot.py step STEP.json [STEP.json ...] -o step.png
      `ztier bench step --json` results: measured step time against the
      bound max(compute, bytes / device bandwidth), one point per run.
  plot.py timeline TIMELINE.json -o timeline.png [--step N] [--rank R]
      a `ztier bench step --timeline` file: one step of one rank as a Gantt
      chart (fetch stall, compute, h2d, collective) above the number of NVMe
      reads in flight.

  plot.py optimizer OPT.json [OPT.json ...] -o optimizer.png
      `ztier bench optimizer --json` results (e.g. one per buffer count):
      the optimizer step against the drive's time for its bytes and the
      update's time with the state in memory, per run.

  plot.py rss RSS.json -o rss.png
      `scripts/train_large.py --sweep ... --json RSS.json` results: peak
      resident memory against model size, ztier and plain torch (sizes
      plain torch cannot hold are marked with the model state they need).

Run with the system interpreter: /usr/bin/python3 scripts/plot.py ...
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def human_size(n):
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def plot_sweep(path, out):
    with open(path) as f:
        doc = json.load(f)
    points = doc["points"]
    backends = sorted({p["backend"] for p in points})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), sharey=True,
                             squeeze=False)
    for ax, backend in zip(axes[0], backends):
        mine = [p for p in points if p["backend"] == backend]
        for qd in sorted({p["qd"] for p in mine}):
            best = {}
            for p in mine:
                if p["qd"] == qd:
                    best[p["bs"]] = max(best.get(p["bs"], 0), p["bw_bytes_per_s"])
            xs = sorted(best)
            ax.plot(xs, [best[x] / 1e9 for x in xs], marker="o", label=f"qd {qd}")
        ax.set_xscale("log", base=2)
        sizes = sorted({p["bs"] for p in mine})
        ax.set_xticks(sizes)
        ax.set_xticklabels([human_size(s) for s in sizes], rotation=30)
        ax.set_title(backend)
        ax.set_xlabel("block size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("bandwidth (GB/s, best over threads)")
    fig.suptitle(f"ztier bench sweep: {doc.get('rw', 'read')} on {doc.get('file', '')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_step(paths, out):
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    fig, ax = plt.subplots(figsize=(6, 5))
    top = max(max(r["step_seconds"], r["bound_seconds"]) for r in runs) * 1.15
    ax.plot([0, top], [0, top], color="black", linewidth=1, label="step = bound")
    ax.fill_between([0, top], [0, top], [0, 1.05 * top], color="green", alpha=0.15,
                    label="within 1.05 x bound")
    markers = {"none": "o", "balanced": "s", "fixed": "^", "flops": "D"}
    colors = {}  # one color per model and compute mode
    for r in runs:
        label = f"{r['model']} (1/{r['scale']:g}), compute {r['compute']}"
        first = label not in colors
        if first:
            colors[label] = f"C{len(colors) % 10}"
        ax.scatter(r["bound_seconds"], r["step_seconds"], marker=markers.get(r["compute"], "x"),
                   s=50, color=colors[label], label=label if first else None)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("bound: max(compute, bytes / device bandwidth) (s)")
    ax.set_ylabel("measured step time, median (s)")
    ax.set_title("ztier bench step: step time against the bound", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_timeline(path, out, step, rank):
    with open(path) as f:
        doc = json.load(f)
    spans = [e for e in doc["traceEvents"] if e.get("ph") == "X" and e["pid"] == rank]
    steps = [e for e in spans if e["cat"] == "step"]
    if not steps:
        raise ValueError(f"no steps of rank {rank} in {path}")
    chosen = [e for e in steps if e["args"].get("step") == step] or steps[-1:]
    begin = chosen[0]["ts"]
    end = begin + chosen[0]["dur"]
    inside = [e for e in spans if e["ts"] < end and e["ts"] + e["dur"] > begin]
    rows = ["fetch stall", "compute", "h2d", "collective"]
    rows = [r for r in rows if any(e["cat"] == r for e in inside)]
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(11, 4.5), sharex=True,
                                  gridspec_kw={"height_ratios": [len(rows), 2]})
    colors = {"fetch stall": "tab:red", "compute": "tab:green", "h2d": "tab:blue",
              "collective": "tab:purple"}
    for i, row in enumerate(rows):
        bars = [((e["ts"] - begin) / 1e3, max(e["dur"] / 1e3, 0.02))
                for e in inside if e["cat"] == row]
        ax.broken_barh(bars, (i - 0.4, 0.8), color=colors[row])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.invert_yaxis()
    ax.set_title(f"{chosen[0]['name']} of rank {rank}: {chosen[0]['dur'] / 1e3:.1f} ms "
                 f"({path.split('/')[-1]})", fontsize=10)
    # NVMe reads in flight over time.
    edges = []
    for e in inside:
        if e["cat"] == "nvme read":
            edges.append(((e["ts"] - begin) / 1e3, 1))
            edges.append(((e["ts"] + e["dur"] - begin) / 1e3, -1))
    edges.sort()
    xs, ys, n = [0.0], [0], 0
    for t, d in edges:
        xs.append(t)
        ys.append(n)
        n += d
        xs.append(t)
        ys.append(n)
    xs.append((end - begin) / 1e3)
    ys.append(n)
    axr.fill_between(xs, ys, step=None, color="tab:orange", alpha=0.6)
    axr.set_ylabel("nvme reads\nin flight")
    axr.set_xlabel("ms from the start of the step")
    axr.set_xlim(0, (end - begin) / 1e3)
    for a in (ax, axr):
        a.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_optimizer(paths, out):
    docs = []
    for path in paths:
        with open(path) as f:
            docs.append(json.load(f))
    docs.sort(key=lambda d: (d["buffers"], d["sub_group_size"]))
    labels = [f"{d['buffers']} buffer{'s' if d['buffers'] != 1 else ''}\n"
              f"{d['sub_groups']} sub-groups" for d in docs]
    series = [("step", "step_s", "tab:blue"),
              ("drive time for its bytes", "drive_s", "tab:gray"),
              ("update, state in memory", "update_in_memory_s", "tab:green")]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(docs), 4))
    width = 0.8 / len(series)
    for k, (name, key, color) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(docs))]
        ax.bar(xs, [d[key] for d in docs], width, label=name, color=color)
    for i, d in enumerate(docs):
        ax.annotate(f"{d['step_over_bound']:.2f}x", (i - width, d["step_s"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(docs)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("seconds (median of runs)")
    d0 = docs[0]
    ax.set_title(f"ztier bench optimizer: {d0['model'].rsplit('/', 1)[-1]} scaled 1/{d0['scale']:g}, "
                 f"{d0['elements'] / 1e6:.0f} M elements, {d0['isa']} update, {d0['threads']} "
                 f"thread{'s' if d0['threads'] != 1 else ''}",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_rss(path, out):
    with open(path) as f:
        rows = json.load(f)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    gib = float(1 << 30)
    for mode, color, label in (("ztier", "tab:blue", "ztier (parameters, gradients, "
                                "AdamW state on NVMe)"),
                               ("torch", "tab:red", "plain torch (AdamW, all in memory)")):
        pts = sorted((r["params"], r["peak_rss"]) for r in rows
                     if r["mode"] == mode and r.get("peak_rss"))
        if pts:
            ax.plot([p / 1e9 for p, _ in pts], [m / gib for _, m in pts], marker="o",
                    color=color, label=label)
        for r in rows:
            if r["mode"] == mode and not r.get("peak_rss"):
                need = 16 * r["params"] / gib
                ax.scatter([r["params"] / 1e9], [need], marker="x", color=color)
                ax.annotate(f"does not fit\n(16 B/param = {need:.0f} GiB)",
                            (r["params"] / 1e9, need), fontsize=8, ha="right", va="bottom")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("peak host memory against model size", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["sweep", "step", "timeline", "optimizer", "rss"])
    ap.add_argument("inputs", nargs="+", help="JSON files written by ztier")
    ap.add_argument("-o", "--output", required=True, help="PNG to write")
    ap.add_argument("--step", type=int, default=2, help="timeline: the step to draw")
    ap.add_argument("--rank", type=int, default=0, help="timeline: the rank to draw")
    a = ap.parse_args()
    try:
        if a.kind == "sweep":
            if len(a.inputs) != 1:
                ap.error("sweep takes one JSON file")
            plot_sweep(a.inputs[0], a.output)
        elif a.kind == "timeline":
            plot_timeline(a.inputs[0], a.output, a.step, a.rank)
        elif a.kind == "optimizer":
            plot_optimizer(a.inputs, a.output)
        elif a.kind == "rss":
            plot_rss(a.inputs[0], a.output)
        else:
            plot_step(a.inputs, a.output)
    except (OSError, KeyError, ValueError) as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 1
    print(f"plot.py: wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
