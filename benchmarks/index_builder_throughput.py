"""Blending-index throughput: our C++ builder against megatron-core's helpers_cpp.build_blending_indices.

Both build the same single-phase index (identical output is checked) over L languages with
temperature weights p_i ~ n_i^tau from a skewed (log-normal) token distribution:
L=60 (mmBERT pre-training, tau 0.7) and L=1833 (decay, tau 0.3), N=10M samples each.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/index_builder_throughput.py [--samples N] [--repeats R] [--append]

Each side runs R times, interleaved, and its best time counts (the build machine is shared: the
best run is the one least disturbed by other jobs). ``--append`` adds a section to
benchmarks/RESULTS.md (date, machine, load average, command, ratios).
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, machine  # noqa: E402


def weights(L, tau, seed=0):
    n = np.random.default_rng(seed).lognormal(18, 2.5, L)
    w = n ** tau
    return w / w.sum()


def megatron(w, n):
    from megatron.core.datasets import helpers_cpp

    di = np.zeros(n, np.int16)
    dsi = np.zeros(n, np.int64)
    t = time.perf_counter()
    helpers_cpp.build_blending_indices(di, dsi, w, len(w), n, False)
    return time.perf_counter() - t, di, dsi


def ours(w, n):
    from megatron_mmbert.data import _index_builder as ib

    args = [w[None].copy(), np.array([n], np.int64), np.zeros(1, np.int64), "fast"]
    t = time.perf_counter()
    di, dsi, _, stats = ib.build_blending_indices(*args)
    return time.perf_counter() - t, di, dsi, stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; the best counts")
    ap.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    ap.add_argument("--note", action="append", default=[], help="a bullet to add to the appended section")
    args = ap.parse_args(argv)
    rows = []
    for L, tau in ((60, 0.7), (1833, 0.3)):
        w = weights(L, tau)
        tm = to = float("inf")
        same = True
        for _ in range(max(1, args.repeats)):
            t, dm, sm = megatron(w, args.samples)
            tm = min(tm, t)
            t, do, so, stats = ours(w, args.samples)
            to = min(to, t)
            same = same and np.array_equal(dm, do) and np.array_equal(sm, so)
            del dm, sm, do, so
        rows.append((L, tau, tm, to, same, stats))
        print(f"L={L:5d} tau={tau}: megatron {args.samples / tm / 1e6:7.2f}M samples/s ({tm:.2f}s), "
              f"ours {args.samples / to / 1e6:7.2f}M samples/s ({to:.3f}s), ratio {tm / to:5.1f}x, "
              f"identical={same}, best of {args.repeats}, per step {({k: round(v / args.samples, 4) for k, v in stats.items()})}",
              flush=True)
        if not same:
            print("ERROR: outputs differ", file=sys.stderr)
            return 1
    if args.append:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
        lines = [
            "",
            f"## Blending index builder vs megatron-core helpers_cpp ({date})",
            "",
            f"- machine: {machine()} (at the end of the run)",
            f"- command: `OPENBLAS_NUM_THREADS=1 python benchmarks/index_builder_throughput.py --samples {args.samples} --repeats {args.repeats} --append`",
            f"- timing: best of {args.repeats} interleaved runs for each side (wall clock, output allocation included for ours)",
            "- anchor: `megatron.core.datasets.helpers_cpp.build_blending_indices` (0.16.1), same weights, same N, "
            "outputs checked identical",
            "",
            "| L | tau | megatron samples/s | ours samples/s | ratio |",
            "|---|---|---|---|---|",
        ]
        for L, tau, tm, to, _, stats in rows:
            lines.append(f"| {L} | {tau} | {args.samples / tm / 1e6:.2f}M | {args.samples / to / 1e6:.2f}M | {tm / to:.1f}x |")
        lines.append("")
        for L, tau, _, _, _, stats in rows:
            per_step = ", ".join(f"{k} {v / args.samples:.4g}" for k, v in stats.items())
            lines.append(f"- L={L} work per sample (ours): {per_step or 'plain loop'}")
        lines.extend(f"- {note}" for note in args.note)
        append_results("\n".join(lines))
        print("appended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
