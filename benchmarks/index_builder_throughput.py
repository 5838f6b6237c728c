"""Blending-index throughput: our C++ builder against megatron-core's helpers_cpp.build_blending_indices.

Both build the same single-phase index (identical output is checked) over L languages with
temperature weights p_i ~ n_i^tau from a skewed (log-normal) token distribution:
L=60 (mmBERT pre-training, tau 0.7) and L=1833 (decay, tau 0.3), N=10M samples each.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/index_builder_throughput.py [--samples N] [--append]

``--append`` adds a section to benchmarks/RESULTS.md (date, machine, command, ratios).
"""

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np


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


def ours(w, n, hot_target=None):
    from megatron_mmbert.data import _index_builder as ib

    args = [w[None].copy(), np.array([n], np.int64), np.zeros(1, np.int64), "fast"]
    if hot_target is not None:
        args.append(hot_target)
    t = time.perf_counter()
    di, dsi, _, stats = ib.build_blending_indices(*args)
    return time.perf_counter() - t, di, dsi, stats


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10_000_000)
    ap.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    rows = []
    for L, tau in ((60, 0.7), (1833, 0.3)):
        w = weights(L, tau)
        tm, dm, sm = megatron(w, args.samples)
        to, do, so, stats = ours(w, args.samples)
        same = np.array_equal(dm, do) and np.array_equal(sm, so)
        rows.append((L, tau, tm, to, same, stats))
        print(f"L={L:5d} tau={tau}: megatron {args.samples / tm / 1e6:7.2f}M samples/s ({tm:.2f}s), "
              f"ours {args.samples / to / 1e6:7.2f}M samples/s ({to:.3f}s), ratio {tm / to:5.1f}x, "
              f"identical={same}, {stats}", flush=True)
        if not same:
            print("ERROR: outputs differ", file=sys.stderr)
            return 1
    if args.append:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
        lines = [
            "",
            f"## Blending index builder vs megatron-core helpers_cpp ({date})",
            "",
            f"- machine: {os.cpu_count()} CPUs (`nproc` {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}), {cpu_model()}; shared with other jobs",
            f"- command: `OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/index_builder_throughput.py --samples {args.samples} --append`",
            "- anchor: `megatron.core.datasets.helpers_cpp.build_blending_indices` (0.16.1), same weights, same N, "
            "outputs checked identical",
            "",
            "| L | tau | megatron samples/s | ours samples/s | ratio |",
            "|---|---|---|---|---|",
        ]
        for L, tau, tm, to, _, _ in rows:
            lines.append(f"| {L} | {tau} | {args.samples / tm / 1e6:.2f}M | {args.samples / to / 1e6:.2f}M | {tm / to:.1f}x |")
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
