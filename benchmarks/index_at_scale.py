"""The data index at mmBERT's scale: time, peak RSS and cache size of ``build_data_index`` on a
synthetic FineWeb2-shaped manifest and the shipped mmBERT schedule scaled by a factor.

The manifest: 1833 streams, as the shipped mixture names them: the named sources of the
configs' ``fixed_shares`` (``dclm``, ``starcoder``, ...; docs/data.md "Named sources"), the 108
languages of ``mmbert_mid`` and made-up ``xNNNN_Synt`` names for the rest; documents per stream
heavy-tailed (log-normal, sigma 2.8, largest first: ``dclm`` (English), then the mid-training
languages, then the other sources), document lengths log-normal (median ~330, mean ~600 tokens).
Only the megatron-core ``.idx`` files are written (``IndexedDataset`` reads document lengths from
them); each ``.bin`` is a sparse file of the right size (all zeros: no document starts with
``<bos>``, which best_fit handles as for any shard without one); the manifest records that framing as
preprocessing would (``framing``: no document starts with ``<bos>`` or ends with ``<eos>``), so the build
reads a sample of documents, not every one (``--no-framing-record``: without the record, every document's
first and last token read as for other tools' shards). The corpus is ``FULL_DOCUMENTS x
factor`` documents (FineWeb2 has about 5 billion), the schedule ``mmbert_base.yaml``'s phases with
tokens x factor and the decay phase of ``decay_all.yaml`` (all languages, its fixed shares),
global batch 4608, best_fit in the shipped packed rows (micro_batch x seq_len: 48, 6, 6 rows).

Each build runs in a fresh subprocess; its peak RSS is ``resource.getrusage(RUSAGE_CHILDREN)
.ru_maxrss`` read by a wrapper process that ran only it, its CPU time (user + system, which other
jobs on a shared machine disturb less than the wall time) from the same call. The full run is extrapolated linearly
from the two scales (time, RSS and cache all grow with the schedule's samples and the corpus).
Its wall time on a node's threads (``--node-threads``, 16) is modelled from what was measured, not
guessed (:func:`schedule_model`): each language's packing task time (thread CPU seconds, recorded by
wrapping the builder's own functions) at the two largest one-thread scales, extrapolated to the full
run and run through the builder's scheduling (:func:`simulate`: its start order, thread count and
document budget, the main thread writing languages in order); the same simulation on the measured
task times is shown beside the measured multi-thread wall time as a check.

    PYTHONPATH=. python benchmarks/index_at_scale.py [--scales 0.001 0.01] [--packing best_fit concat]
        [--threads 1 2] [--node-threads 16] [--corpus-scale F] [--code-root DIR] [--label after]
        [--manifest MANIFEST] [--json OUT]

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


def _config(name: str) -> dict:
    import yaml

    return yaml.safe_load(open(os.path.join(ROOT, "examples", "configs", name)))


def named_sources() -> list:
    """The named sources of the shipped mixture (every ``fixed_shares`` key of mmbert_base.yaml's
    phases and decay_all.yaml's decay), in order of first appearance: ``dclm`` first."""
    cfg = _config("mmbert_base.yaml")
    shares = [p["fixed_shares"] for p in cfg["phases"]] + [_config("decay_all.yaml")["phases"]["decay"]["fixed_shares"]]
    return list(dict.fromkeys(k for s in shares for k in s))


def _mmbert_phases(factor: float, languages=None):
    cfg = _config("mmbert_base.yaml")
    sets = cfg["language_sets"]
    decay_all = _config("decay_all.yaml")["phases"]["decay"]
    phases = []
    for p in cfg["phases"]:
        p = dict(p)
        p["tokens"] = int(p["tokens"] * factor)
        if p["name"] == "decay":  # Decay-All: every language, its shares
            p.update(decay_all)
        if languages:  # another manifest: every phase over all its languages, fixed shares kept where present
            p["languages"] = "all"
            p["fixed_shares"] = {k: v for k, v in p["fixed_shares"].items() if k in languages}
        elif p["languages"] != "all":
            p["languages"] = sets[p["languages"]]
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
    sources = named_sources()
    names = sources[:1] + [n for n in named if n not in sources] + sources[1:]
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
import json, os, sys, time
sys.path.insert(0, {root!r})
from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.data.index import build_data_index
from megatron_mmbert.data.shards import load_manifest
timings = {{"tasks": {{}}, "framing": {{}}, "blend_cpu": 0.0, "copy": [0, 0.0], "order": None}}
{instrument}
phases = [PhaseConfig(**p) for p in json.loads({phases!r})]
manifest = load_manifest({manifest!r})
# The trainer's process has megatron-core loaded; the build itself imports it only for a large .idx.
import megatron.core.datasets.indexed_dataset
t = time.perf_counter()
index = build_data_index(manifest, phases, 21, {cache!r}, {batch}, is_builder=True,
                         packing={packing!r}, bin_rows={bin_rows!r}{threads_arg})
timings["documents"] = {{lang: e.documents for lang, e in manifest.languages.items()}}
print(json.dumps({{"seconds": time.perf_counter() - t, "path": index.path, "timings": timings}}))
"""

INSTRUMENT = """
# Per-language task times of the packing (thread CPU: what the language costs whatever else runs),
# the blending's and the spill copy's, recorded by wrapping the builder's own functions where they
# are called (the code under test is otherwise untouched): the package's build module
# (megatron_mmbert/data/index/build.py) schedules the languages, its pack module reads the framing. Code without it (an older commit under --code-root) runs unwrapped:
# its time, CPU and RSS are measured, not its task times.
mod = sys.modules.get("megatron_mmbert.data.index.build")
def _bytes(sink):
    if hasattr(sink, "out"):  # the phase files themselves (one thread)
        return sum(a._f.tell() for acc in sink.out for a in acc.values())
    return sum(e[0].tell() for e in sink.files.values()) + _held(sink)
def _held(sink):  # blocks a spill holds in memory (none in older code)
    return sum(c.nbytes for chunks in getattr(sink, "held", {}).values() for c in chunks)
if mod is not None and hasattr(mod, "pack_language"):
    pack, blend = mod.pack_language, mod.blend_phase
    def timed_pack(ext, manifest, lang, *a):
        sink = next(x for x in reversed(a) if hasattr(x, "append"))  # the phase files or a spill folder
        c, w, b = time.thread_time(), time.perf_counter(), _bytes(sink)
        res = pack(ext, manifest, lang, *a)
        timings["tasks"][lang] = [time.thread_time() - c, time.perf_counter() - w, _bytes(sink) - b]
        return res
    def timed_blend(*a):
        c = time.thread_time()
        out = blend(*a)
        timings["blend_cpu"] += time.thread_time() - c
        return out
    mod.pack_language, mod.blend_phase = timed_pack, timed_blend
    if hasattr(mod, "language_schedule"):
        schedule = mod.language_schedule
        def recorded(plans, *a):
            order = schedule(plans, *a)
            timings["order"] = [plans[0].languages[i] for i in order]
            return order
        mod.language_schedule = recorded
    spill = getattr(mod, "SpillFiles", None)
    if spill is not None:
        copy = spill.copy_into
        def timed_copy(self, files):
            c, b = time.thread_time(), sum(os.path.getsize(e[0].name) for e in self.files.values()) + _held(self)
            copy(self, files)
            timings["copy"][0] += b
            timings["copy"][1] += time.thread_time() - c
        spill.copy_into = timed_copy
    mod = sys.modules[pack.__module__]  # where the language's framing is read
    if hasattr(mod, "framing_flags"):  # part of a task: the read of every document's first / last token
        framing = mod.framing_flags
        import inspect
        timings["framing_pool"] = "pool" in inspect.signature(framing).parameters
        def timed_framing(manifest, lang, *a):
            # The caller's thread CPU: the whole scan on one thread (the runs the model reads); with a
            # framing pool only the caller's share.
            c = time.thread_time()
            out = framing(manifest, lang, *a)
            timings["framing"][lang] = time.thread_time() - c
            return out
        mod.framing_flags = timed_framing
"""


def measure(code_root: str, manifest: str, phases, packing: str, cache: str, threads=None) -> dict:
    """Run one build in a child of this (wrapper) process: seconds, peak RSS (MB), cache MB, and the
    1-minute load average when it ended (the machine's other work). ``threads`` None: the builder's
    default (for code from before the ``threads`` argument)."""
    src = CHILD.format(root=code_root, phases=json.dumps(phases), manifest=manifest, cache=cache,
                       batch=GLOBAL_BATCH, packing=packing, instrument=INSTRUMENT,
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
            "peak_rss_mb": round(rss), "cache_mb": round(size / 2**20), "load_avg": round(os.getloadavg()[0], 2),
            "timings": res["timings"]}


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
    print(json.dumps({k: v for k, v in r.items() if k != "timings"}), flush=True)
    return r


def _linear(a: float, b: float, sa: float, sb: float, floor: bool = True) -> float:
    """The value at scale 1 of the line through (sa, a) and (sb, b); at least b when ``floor``."""
    v = b + (b - a) / (sb - sa) * (1 - sb)
    return max(v, b) if floor else v


def simulate(order, names, task_s, copy_s, documents, threads: int, budget: int, before_s: float = 0.0,
             after_s: float = 0.0, framing_s=None, chunk: int = 1 << 16) -> dict:
    """The build's packing on ``threads`` workers as ``_pack_languages`` runs it: languages submitted
    in ``order`` (the builder's ``language_schedule``), at most 2 x threads and ``budget`` documents
    submitted and unfinished at once (a language over the budget alone), run first come first served;
    the main thread writes them in ``names`` order, each when it and all before it are done, taking
    ``copy_s`` (its spill copy; 0 on one thread, which writes in place). ``before_s`` / ``after_s``:
    serial work around the packing (blending, offsets). ``framing_s`` (the part of each task that is
    its framing scan; threads > 1): read in chunks of ``chunk`` documents on a second pool of
    ``threads`` workers, first come first served, the task's thread waiting for its last chunk, then
    packing for the rest of its time. Returns the wall seconds, the longest task and the most
    documents running at once (their per-document state is the memory that grows)."""
    import heapq

    events, queue, free, now = [], [], threads, before_s
    submitted, finished, at, peak_docs, running_docs = {}, set(), 0, 0, 0
    framing_free = [before_s] * threads  # when each framing worker is next free
    split = bool(framing_s) and threads > 1

    def start(j, t):
        nonlocal running_docs, peak_docs
        if split:
            pieces = max(-(-documents[j] // chunk), 1)
            end = t
            for _ in range(pieces):
                begin = max(heapq.heappop(framing_free), t)
                heapq.heappush(framing_free, begin + framing_s[j] / pieces)
                end = max(end, begin + framing_s[j] / pieces)
            heapq.heappush(events, (end + task_s[j] - framing_s[j], j))
        else:
            heapq.heappush(events, (t + task_s[j], j))
        running_docs += documents[j]
        peak_docs = max(peak_docs, running_docs)

    def pop():
        nonlocal free, running_docs, now
        t, j = heapq.heappop(events)
        now = max(now, t)
        finished.add(j)
        running_docs -= documents[j]
        del submitted[j]
        if queue:
            start(queue.pop(0), t)
        else:
            free += 1

    for i in names:
        while i not in finished:
            while events and events[0][0] <= now:
                pop()
            if i in finished:
                break
            while at < len(order) and len(submitted) < 2 * threads and (
                    not submitted or sum(submitted.values()) + documents[order[at]] <= budget):
                j = order[at]
                submitted[j] = documents[j]
                at += 1
                if free:
                    free -= 1
                    start(j, now)
                else:
                    queue.append(j)
            if i not in finished:
                pop()
        now += copy_s.get(i, 0.0)
    return {"seconds": round(now + after_s, 1), "longest_task_seconds": round(max(task_s.values()), 1),
            "longest_task": max(task_s, key=task_s.get), "peak_running_documents": int(peak_docs)}


def schedule_model(rows, packing: str, node_threads: int, budget: int) -> list:
    """The full run's wall time on ``node_threads`` threads, modelled, not guessed: every language's
    packing task time (its thread CPU seconds at the two largest one-thread scales, extrapolated to
    the full run linearly, as the corpus and the schedule both grow), run through :func:`simulate`
    with the builder's start order and document budget, plus the serial blending and the rest of the
    build (extrapolated the same way) and the main thread's spill copy (each language's bytes at the
    copy rate measured with 2+ threads). Also checked against the measurement: the same simulation
    on the measured (not extrapolated) task times at the largest scale, beside its measured wall
    time with 2+ threads. Peak RSS: the smallest scale's one-thread RSS, plus the per-document bytes
    that RSS grew by (fitted on the largest language's documents) for the most documents running
    at once, plus each extra thread's fixed cost (measured between one and two threads)."""
    one = sorted((r for r in rows if r["packing"] == packing and r.get("threads") in (1, None)
                  and r.get("timings", {}).get("tasks")), key=lambda r: r["scale"])
    if len(one) < 2:
        return []
    a, b = one[-2], one[-1]
    sa, sb = a["scale"], b["scale"]
    ta, tb = a["timings"], b["timings"]
    names = sorted(tb["tasks"])
    task_full = {n: _linear(ta["tasks"].get(n, [0.0])[0], tb["tasks"][n][0], sa, sb) for n in names}
    docs_full = {n: round(tb["documents"][n] / sb) for n in names}
    blend = _linear(ta["blend_cpu"], tb["blend_cpu"], sa, sb)
    rest = _linear(a["cpu_seconds"] - sum(v[0] for v in ta["tasks"].values()) - ta["blend_cpu"],
                   b["cpu_seconds"] - sum(v[0] for v in tb["tasks"].values()) - tb["blend_cpu"], sa, sb)
    order_b = tb.get("order") or names
    multi = sorted((r for r in rows if r["packing"] == packing and (r.get("threads") or 1) > 1
                    and r.get("timings", {}).get("copy", [0])[0]), key=lambda r: r["scale"])
    rate = multi[-1]["timings"]["copy"][0] / max(multi[-1]["timings"]["copy"][1], 1e-9) if multi else None
    out = []
    if multi:  # the model on what was measured: the largest multi-thread scale, its own task times
        m = multi[-1]
        same = [r for r in one if r["scale"] == m["scale"]]
        if same:
            t1 = same[0]["timings"]
            check = simulate(t1.get("order") or sorted(t1["tasks"]), sorted(t1["tasks"]),
                             {n: v[0] for n, v in t1["tasks"].items()},
                             {n: v[2] / rate for n, v in t1["tasks"].items()}, t1["documents"], m["threads"],
                             budget, t1["blend_cpu"],
                             same[0]["cpu_seconds"] - sum(v[0] for v in t1["tasks"].values()) - t1["blend_cpu"],
                             {n: min(t1["framing"].get(n, 0.0), v[0]) for n, v in t1["tasks"].items()}
                             if t1.get("framing_pool") else None)
            out.append({"scale": m["scale"], "packing": packing, "threads": m["threads"], "model": "check",
                        "modelled_seconds": check["seconds"], "measured_seconds": m["seconds"],
                        "measured_cpu_seconds": m["cpu_seconds"], "load_avg": m["load_avg"]})
    small = one[0]
    d_small = max(small["timings"]["documents"].values())
    d_b = max(tb["documents"].values())
    per_doc = max((b["peak_rss_mb"] - small["peak_rss_mb"]) / max(d_b - d_small, 1), 0.0)  # MB a document
    two = [r for r in rows if r["packing"] == packing and r.get("threads") == 2 and r["scale"] == small["scale"]]
    per_thread = max(two[0]["peak_rss_mb"] - small["peak_rss_mb"], 0) if two else 0
    # The framing scan (every document's first and last token read from the .bin) on its own: what a
    # task would cost if preprocessing recorded the framing (on real shards it is a read of the corpus).
    fr_full = {n: min(_linear(ta.get("framing", {}).get(n, 0.0), tb.get("framing", {}).get(n, 0.0), sa, sb),
                      task_full[n]) for n in names}
    split_framing = bool(tb.get("framing_pool"))  # the builder reads framing chunks on a pool of their own
    for n in sorted({1, 2, node_threads}):
        copy = {name: _linear(ta["tasks"].get(name, [0, 0, 0])[2], tb["tasks"][name][2], sa, sb) / rate
                for name in names} if (rate and n > 1) else {}
        for variant, tasks in (("simulated", task_full),
                               ("simulated, no framing scan", {k: max(v - fr_full[k], 0.0) for k, v in task_full.items()})):
            if variant != "simulated" and not any(fr_full.values()):
                continue
            sim = simulate(order_b if n > 1 else names, names, tasks, copy, docs_full, n, budget, blend, rest,
                           fr_full if (variant == "simulated" and split_framing) else None)
            rss = small["peak_rss_mb"] - per_doc * d_small + per_doc * sim["peak_running_documents"] + per_thread * (n - 1)
            out.append({"scale": 1.0, "packing": packing, "threads": n, "model": variant, **sim,
                        "serial_seconds": round(blend + rest, 1), "copy_seconds": round(sum(copy.values()), 1),
                        "task_cpu_seconds": round(sum(tasks.values()), 1),
                        "framing_cpu_seconds": round(sum(fr_full.values()), 1) if variant == "simulated" else 0.0,
                        "bytes_per_document": round(per_doc * 2**20, 1), "peak_rss_mb": round(rss)})
    for r in out:
        print(json.dumps(r), flush=True)
    return out


KEYS = ("seconds", "cpu_seconds", "peak_rss_mb", "cache_mb")


def extrapolate(rows, packings, thread_counts):
    """Linear extrapolation to the full run from the two largest scales, per packing and thread count
    (the wall time of a node's threads is :func:`schedule_model`'s)."""
    out = []
    for packing in packings:
        for threads in thread_counts:
            pts = sorted((r for r in rows if r["packing"] == packing and r.get("threads") == threads
                          and not r.get("extrapolated") and not r.get("model")), key=lambda r: r["scale"])[-2:]
            if len(pts) == 2:
                (a, b) = pts
                ext = {k: round(b[k] + (b[k] - a[k]) / (b["scale"] - a["scale"]) * (1 - b["scale"]), 1) for k in KEYS}
                out.append({"scale": 1.0, "packing": packing, "threads": threads, "extrapolated": True, **ext})
    for r in out:
        print(json.dumps(r), flush=True)
    return out


def _thread_document_budget(code_root: str) -> int:
    """The builder's ``THREAD_DOCUMENT_BUDGET`` (2^30 where the code has none)."""
    out = subprocess.run([sys.executable, "-c", "import megatron_mmbert.data.index as m; "
                          "print(getattr(m, 'THREAD_DOCUMENT_BUDGET', 1 << 30))"],
                         env=dict(os.environ, PYTHONPATH=code_root), capture_output=True, text=True)
    return int(out.stdout.strip() or (1 << 30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.001, 0.01])
    ap.add_argument("--packing", nargs="+", default=["best_fit", "concat"])
    ap.add_argument("--code-root", default=ROOT)
    ap.add_argument("--manifest", default=None,
                    help="use this manifest (every phase over all its languages) instead of the synthetic one")
    ap.add_argument("--corpus-scale", type=float, default=None,
                    help="the synthetic corpus at this scale whatever the schedule's (default: each --scales "
                    "value): memory against the run's length alone, the per-document state held fixed")
    ap.add_argument("--workdir", default=None, help="where manifests and caches go (default: a temp folder)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="languages packed at once, one build per count (default: the builder's own default)")
    ap.add_argument("--node-threads", type=int, default=16,
                    help="threads of the node the full run's wall time is modelled for (schedule_model: the "
                    "builder's scheduling simulated on the one-thread runs' per-language task times)")
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
            corpus = args.corpus_scale or f
            mroot = os.path.join(work, f"manifest-{corpus:g}" + ("-unrecorded" if args.no_framing_record else ""))
            path = os.path.join(mroot, "manifest.json")
            if not os.path.exists(path):
                t = time.perf_counter()
                write_manifest(mroot, corpus, framing_record=not args.no_framing_record)
                print(f"[index_at_scale] manifest 1/{1 / corpus:g} written in {time.perf_counter() - t:.1f}s",
                      file=sys.stderr)
        for packing in args.packing:
            for threads in args.threads or [None]:
                rows.append(_run_one(args, work, path, phases, packing, f, threads))
    rows += extrapolate(rows, args.packing, args.threads or [None])
    budget = _thread_document_budget(args.code_root)
    for packing in args.packing:
        if not args.corpus_scale:  # the model scales the corpus with the schedule
            rows += schedule_model(rows, packing, args.node_threads, budget)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
