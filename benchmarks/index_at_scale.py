"""The data index at mmBERT's scale: time, peak RSS and cache size of ``build_data_index`` on a
synthetic FineWeb2-shaped manifest and the shipped mmBERT schedule scaled by a factor.

The manifest: 1833 languages (the 110 of examples/configs/mmbert_base.yaml, ``code``, and made-up
``xNNNN_Synt`` names for the rest), documents per language heavy-tailed (log-normal, sigma 2.8,
largest first to eng_Latn and the pre-training languages), document lengths log-normal (median ~330,
mean ~600 tokens). Only the megatron-core ``.idx`` files are written (``IndexedDataset`` reads
document lengths from them); each ``.bin`` is a sparse file of the right size (all zeros: no
document starts with ``<bos>``, which best_fit handles as for any shard without one); the manifest
records that framing as preprocessing would (``framing``: no document starts with ``<bos>`` or ends
with ``<eos>``), so the build reads a sample of documents, not every one (``--no-framing-record``:
without the record, every document's first and last token read as for other tools' shards). The corpus
is ``FULL_DOCUMENTS x factor`` documents (FineWeb2 has about 5 billion), the schedule
``mmbert_base.yaml``'s phases with tokens x factor and the decay phase over all languages
(Decay-All), global batch 4608, best_fit in the shipped packed rows (micro_batch x seq_len: 48, 6, 6 rows).

Each build runs in a fresh subprocess; its peak RSS is ``resource.getrusage(RUSAGE_CHILDREN)
.ru_maxrss`` read by a wrapper process that ran only it, its CPU time (user + system, which other
jobs on a shared machine disturb less than the wall time) from the same call. The full run is extrapolated linearly
from the two scales (time, RSS and cache all grow with the schedule's samples and the corpus).

    PYTHONPATH=. python benchmarks/index_at_scale.py [--scales 0.001 0.01] [--packing best_fit concat]
        [--code-root DIR] [--label after] [--manifest MANIFEST] [--json OUT]

``--code-root``: the repository whose ``megatron_mmbert`` builds (e.g. an export of an older
commit, to measure a baseline on the same manifest).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL_DOCUMENTS = 5_000_000_000
"""Documents of the full synthetic corpus (FineWeb2's order of magnitude)."""
NUM_LANGUAGES = 1833
GLOBAL_BATCH = 4608


def _mmbert_phases(factor: float, languages=None):
    import yaml

    cfg = yaml.safe_load(open(os.path.join(ROOT, "examples", "configs", "mmbert_base.yaml")))
    sets = cfg["language_sets"]
    phases = []
    for p in cfg["phases"]:
        p = dict(p)
        p["tokens"] = int(p["tokens"] * factor)
        p["languages"] = "all" if p["name"] == "decay" or languages else sets[p["languages"]]
        if languages:  # another manifest: every phase over all its languages, fixed shares kept where present
            p["fixed_shares"] = {k: v for k, v in p["fixed_shares"].items() if k in languages}
        elif p["name"] == "decay":
            p["fixed_shares"] = {"eng_Latn": 0.102, "code": 0.055}  # decay_all.yaml
        else:  # the synthetic manifest has no named sources (dclm, starcoder, ...): their shares dropped
            p["fixed_shares"] = {k: v for k, v in p["fixed_shares"].items()
                                 if k in set(sets["mmbert_mid"]) | {"eng_Latn", "code"}}
        phases.append(p)
    return phases, sets["mmbert_mid"]


def mmbert_micro_batches(names):
    """mmbert_base.yaml's micro-batch size of each phase: best_fit's packed rows (``data.packed_row:
    micro_batch``, the shipped geometry) hold that many ``seq_len`` rows."""
    import yaml

    batch = yaml.safe_load(open(os.path.join(ROOT, "examples", "configs", "mmbert_base.yaml")))["batch"]
    return [batch.get("micro_batch_size_per_phase", {}).get(n, batch["micro_batch_size"]) for n in names]


def write_manifest(root: str, factor: float, seed: int = 0, framing_record: bool = True) -> str:
    """The synthetic manifest (``.idx`` + sparse ``.bin`` per language) for ``factor``; returns its path.
    ``framing_record``: record the shards' framing as preprocessing does (``data/shards.py``
    ``DocumentFraming``: the all-zero documents neither start with ``<bos>`` nor end with ``<eos>``)."""
    from megatron.core.datasets.indexed_dataset import DType, _INDEX_HEADER

    _, named = _mmbert_phases(1.0)
    names = [n for n in named if n != "code"]
    names = ["eng_Latn"] + [n for n in names if n != "eng_Latn"] + ["code"]
    names += [f"x{i:04d}_Synt" for i in range(NUM_LANGUAGES - len(names))]
    rng = np.random.default_rng(seed)
    share = np.sort(rng.lognormal(0.0, 2.8, NUM_LANGUAGES))[::-1]
    docs = np.maximum((share / share.sum() * FULL_DOCUMENTS * factor).astype(np.int64), 4)
    langs = {}
    os.makedirs(root, exist_ok=True)
    for i, (name, n) in enumerate(zip(names, docs)):
        lengths = np.clip(rng.lognormal(np.log(330), 1.1, int(n)), 8, 100_000).astype(np.int32)
        prefix = os.path.join(root, name, "part-00000")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * 4, out=pointers[1:])
        with open(prefix + ".idx", "wb") as f:  # megatron-core's _IndexWriter layout
            f.write(_INDEX_HEADER)
            f.write(np.array([1], "<u8").tobytes())
            f.write(np.array([DType.code_from_dtype(np.int32)], "<u1").tobytes())
            f.write(np.array([len(lengths), len(lengths) + 1], "<u8").tobytes())
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(lengths.sum()) * 4)  # sparse: no text needed
        langs[name] = {"shards": [os.path.relpath(prefix, root)], "documents": int(n),
                       "tokens": int(lengths.sum()), "bytes": 0, "sources": []}
    special = {"pad": 0, "bos": 1, "eos": 2, "mask": 3, "unk": 4}
    if framing_record:
        for entry in langs.values():
            entry["framing"] = {"bos": special["bos"], "eos": special["eos"], "starts_bos": 0, "ends_eos": 0}
    manifest = {"format": "megatron-mmbert-manifest", "version": 1,
                "tokenizer": {"name": "synthetic", "vocab_size": 256000, "hash": "0" * 64, "special_ids": special,
                              "all_special_ids": sorted(special.values())},
                "dtype": "int32", "languages": langs}
    path = os.path.join(root, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.data.index import build_data_index
from megatron_mmbert.data.shards import load_manifest
phases = [PhaseConfig(**p) for p in json.loads({phases!r})]
t = time.perf_counter()
index = build_data_index(load_manifest({manifest!r}), phases, 21, {cache!r}, {batch}, is_builder=True,
                         packing={packing!r}, bin_rows={bin_rows!r}{threads_arg})
print(json.dumps({{"seconds": time.perf_counter() - t, "path": index.path}}))
"""


def measure(code_root: str, manifest: str, phases, packing: str, cache: str, threads=None) -> dict:
    """Run one build in a child of this (wrapper) process: seconds, peak RSS (MB), cache MB, and the
    1-minute load average when it ended (the machine's other work). ``threads`` None: the builder's
    default (for code from before the ``threads`` argument)."""
    src = CHILD.format(root=code_root, phases=json.dumps(phases), manifest=manifest, cache=cache,
                       batch=GLOBAL_BATCH, packing=packing,
                       threads_arg="" if threads is None else f", threads={int(threads)}",
                       bin_rows=mmbert_micro_batches([p["name"] for p in phases]) if packing == "best_fit" else None)
    env = dict(os.environ, PYTHONPATH=code_root, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", src], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = usage.ru_maxrss / 1024  # KiB on Linux
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(res["path"]) for f in fs)
    return {"seconds": round(res["seconds"], 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(rss), "cache_mb": round(size / 2**20), "load_avg": round(os.getloadavg()[0], 2)}


def _run_one(args, work, path, phases, packing, f, threads) -> dict:
    """One build at scale ``f`` in a fresh wrapper process (its own RUSAGE_CHILDREN); its row."""
    cache = os.path.join(work, f"cache-{f:g}-{packing}-{threads}-{args.label}")
    shutil.rmtree(cache, ignore_errors=True)
    job = dict(code_root=os.path.abspath(args.code_root), manifest=path, phases=phases, packing=packing,
               cache=cache, threads=threads)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps(job)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    r = {"scale": f, "packing": packing, "threads": threads, **json.loads(out.stdout.strip().splitlines()[-1])}
    shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(r), flush=True)
    return r


KEYS = ("seconds", "cpu_seconds", "peak_rss_mb", "cache_mb")


def extrapolate(rows, packings, thread_counts, node_threads: int):
    """Linear extrapolation to the full run from the two largest scales, per packing and thread count;
    with two thread counts also the full run's wall time on ``node_threads`` threads (Amdahl: the
    wall time t(n) = serial + parallel / n fitted to the two counts at each of the two scales)."""
    out = []
    for packing in packings:
        full = {}
        for threads in thread_counts:
            pts = sorted((r for r in rows if r["packing"] == packing and r.get("threads") == threads
                          and not r.get("extrapolated")), key=lambda r: r["scale"])[-2:]
            if len(pts) == 2:
                (a, b) = pts
                ext = {k: round(b[k] + (b[k] - a[k]) / (b["scale"] - a["scale"]) * (1 - b["scale"]), 1) for k in KEYS}
                full[threads] = ext
                out.append({"scale": 1.0, "packing": packing, "threads": threads, "extrapolated": True, **ext})
        counts = sorted(t for t in full if t)
        if len(counts) >= 2:
            n1, n2 = counts[0], counts[-1]
            t1, t2 = full[n1]["seconds"], full[n2]["seconds"]
            parallel = max((t1 - t2) / (1 / n1 - 1 / n2), 0.0)
            serial = max(t1 - parallel / n1, 0.0)
            out.append({"scale": 1.0, "packing": packing, "threads": node_threads, "extrapolated": True,
                        "amdahl_from": [n1, n2], "serial_seconds": round(serial, 1),
                        "parallel_seconds": round(parallel, 1),
                        "seconds": round(serial + parallel / node_threads, 1)})
    for r in out:
        print(json.dumps(r), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.001, 0.01])
    ap.add_argument("--packing", nargs="+", default=["best_fit", "concat"])
    ap.add_argument("--code-root", default=ROOT)
    ap.add_argument("--manifest", default=None,
                    help="use this manifest (every phase over all its languages) instead of the synthetic one")
    ap.add_argument("--workdir", default=None, help="where manifests and caches go (default: a temp folder)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="languages packed at once, one build per count (default: the builder's own default)")
    ap.add_argument("--node-threads", type=int, default=16,
                    help="threads of the node the full-run time is extrapolated for (Amdahl's law from the "
                    "wall times of the smallest and largest --threads at the largest scale)")
    ap.add_argument("--no-framing-record", action="store_true",
                    help="the synthetic manifest without the framing record (the index reads every document's framing)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one build, JSON in/out
    args = ap.parse_args()
    if args.measure:
        job = json.loads(args.measure)
        print(json.dumps(measure(**job)))
        return
    work = args.workdir or tempfile.mkdtemp(prefix="index-at-scale-")
    rows = []
    for f in args.scales:
        if args.manifest:
            path = os.path.abspath(args.manifest)
            phases, _ = _mmbert_phases(f, set(json.load(open(path))["languages"]))
        else:
            phases, _ = _mmbert_phases(f)
            mroot = os.path.join(work, f"manifest-{f:g}" + ("-unrecorded" if args.no_framing_record else ""))
            path = os.path.join(mroot, "manifest.json")
        if not os.path.exists(path):
            t = time.perf_counter()
            write_manifest(mroot, f, framing_record=not args.no_framing_record)
            print(f"[index_at_scale] manifest 1/{1 / f:g} written in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        for packing in args.packing:
            for threads in args.threads or [None]:
                rows.append(_run_one(args, work, path, phases, packing, f, threads))
    rows += extrapolate(rows, args.packing, args.threads or [None], args.node_threads)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
