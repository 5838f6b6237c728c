"""Training throughput: tokens/s per step, MFU and the share of time outside forward/backward.

Runs ``pretrain_mmbert.py`` (the real loop: MLM stream, megatron schedules, DDP, the optimizer,
logging) for one pre-training phase as the shipped configs train: StableAdamW, ``best_fit``
packing, the preset's own vocabulary (256000 for the mmBERT presets: the MLM head is the largest
non-GEMM cost) and the precision asked (amp_bf16 for the shipped configs). Evaluation and
checkpoint saves are off: the phase is longer than the measured steps, and the run is stopped
(its process group killed; it is a throwaway folder) once ``--steps`` are measured or
``--time-limit`` seconds have passed. The per-window timings the loop writes to ``metrics.jsonl``
are read as they come, so a run cut short still reports the windows it finished: data,
forward+backward (GPU time between CUDA events on a GPU), optimizer, other (logging,
bookkeeping). The first window (start-up, index building, kernel compilation) is left out. Goal:
under 10% of the step time outside forward/backward.

``--save async``: one asynchronous checkpoint (``checkpoint.async_save``) of the full training
state at the last measured step (after its window, so the measured windows hold no save), and the
run goes on until it is published: the seconds the step waited (planning and the copy to host
memory), the background write's, and the steps it overlapped. ``--save sync``: the same save
written synchronously (the step waits for all of it), the anchor.

Data: a synthetic corpus made on the spot (default; random token shards with realistic document
lengths and skewed language sizes, written by the project's own shard writer: needs no text, no
tokenizer and no gettext catalogs), or ``--corpus gettext`` (the demo corpus from /usr/share/locale),
or ``--manifest`` (existing shards). Token content does not change the step time.

  python benchmarks/train_throughput.py                              # CPU, tiny model, 2 processes
  python benchmarks/train_throughput.py --device cuda --preset mmbert-base --precision amp_bf16 \
      --nproc 1 --rows 48 --micro-rows 48 --seq-len 1024 --distributed-optimizer   # a GPU: also MFU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import report, machine  # noqa: E402


def python_path() -> str:
    """``PYTHONPATH`` for the child processes: this checkout first, then whatever the caller had (on
    the lent GPU machine megatron-core is reached only through it: ``pip install --target``)."""
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)


def build_synthetic_data(work: str, vocab_size: int, tokens: int, seed: int = 0) -> str:
    """Random-token shards of 12 languages (sizes falling as 1/rank) holding ``tokens`` tokens,
    documents of 50-3000 tokens framed ``<bos> ... <eos>``; returns the manifest path."""
    import numpy as np

    from megatron_mmbert.data.shards import LanguageEntry, Manifest, ShardWriter, TokenizerIdentity, token_dtype, write_manifest

    rng = np.random.default_rng(seed)
    languages = ["eng_Latn", "rus_Cyrl", "cmn_Hani", "fra_Latn", "arb_Arab", "hin_Deva", "jpn_Jpan",
                 "ell_Grek", "kor_Hang", "amh_Ethi", "tzm_Tfng", "fao_Latn"]
    shares = 1.0 / np.arange(1, len(languages) + 1)
    shares /= shares.sum()
    special = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}
    dtype = token_dtype(vocab_size)
    entries = {}
    for lang, share in zip(languages, shares):
        prefix = os.path.join(work, "shards", lang, "part-00000")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        budget, count, documents = max(int(share * tokens), 64), 0, 0
        with ShardWriter(prefix, dtype) as writer:
            while count < budget:
                body = rng.zipf(1.2, size=int(np.clip(rng.lognormal(6.0, 1.0), 50, 3000))) % (vocab_size - 5) + 5
                document = np.concatenate([[special["bos"]], body, [special["eos"]]])
                writer.add_document(document)
                count, documents = count + len(document), documents + 1
            writer.finalize()
        entries[lang] = LanguageEntry(shards=[prefix], documents=documents, tokens=count, bytes=0, sources=[])
    identity = TokenizerIdentity(name="synthetic", vocab_size=vocab_size, hash="0" * 64, special_ids=special,
                                 all_special_ids=sorted(special.values()))
    path = os.path.join(work, "shards", "manifest.json")
    write_manifest(Manifest(tokenizer=identity, dtype=np.dtype(dtype).name, languages=entries), path)
    return path


def build_demo_data(work: str) -> str:
    """Demo corpus -> tokenizer -> shards with the project's own CLIs; returns the manifest path."""
    env = dict(os.environ, PYTHONPATH=python_path())
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], check=True, env=env, cwd=ROOT)  # noqa: E731
    run("examples/demo_corpus/build_gettext_corpus.py", "--output", f"{work}/corpus",
        "--languages", "fra_Latn", "deu_Latn", "rus_Cyrl", "jpn_Jpan", "spa_Latn", "ukr_Cyrl",
        "--max-chars-per-language", "400000")
    run("examples/demo_corpus/train_tokenizer.py", "--corpus", f"{work}/corpus", "--output", f"{work}/tokenizer")
    run("tools/preprocess_data.py", "--input", f"{work}/corpus", "--output", f"{work}/shards",
        "--tokenizer", f"{work}/tokenizer", "--workers", "2")
    return f"{work}/shards/manifest.json"


def read_windows(path: str, kind: str = "train"):
    """The ``train`` windows (records of ``kind``) of ``metrics.jsonl`` written so far (a line being
    written is skipped)."""
    windows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if record.get("kind") == kind:
                    windows.append(record)
    return windows


def read_checkpoints(path: str):
    """The ``checkpoint`` records (published saves) of ``metrics.jsonl`` written so far."""
    return read_windows(path, kind="checkpoint")


def run_training(cmd, env, metrics: str, steps: int, time_limit: float, log_path: str, wait_for_save: bool = False):
    """Run ``cmd`` (torchrun) until its metrics hold a window at step >= ``steps`` (and, with
    ``wait_for_save``, a published checkpoint) or ``time_limit`` seconds pass, then kill its process
    group; returns ``(windows, why it ended)``."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        why = None
        try:
            while why is None:
                time.sleep(1.0)
                windows = read_windows(metrics)
                if windows and windows[-1]["step"] >= steps and (not wait_for_save or read_checkpoints(metrics)):
                    why = f"{windows[-1]['step']} steps done" + (", checkpoint published" if wait_for_save else "")
                elif proc.poll() is not None:
                    why = f"the run exited with code {proc.returncode}"
                elif time.monotonic() - start > time_limit:
                    why = f"time limit of {time_limit:.0f}s reached"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # a throwaway run: no clean stop, no save
                proc.wait()
    return read_windows(metrics), why


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", help="reuse shards (e.g. a quickstart's OUT/shards/manifest.json)")
    p.add_argument("--corpus", choices=["synthetic", "gettext"], default="synthetic",
                   help="data made on the spot when --manifest is not given (default: synthetic)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size (default: the preset's own: 256000 for mmbert-small/base)")
    p.add_argument("--precision", default="amp_bf16", choices=["fp32", "bf16", "amp_bf16"],
                   help="default amp_bf16: what the shipped configs train in")
    p.add_argument("--device", default="cpu", help="cpu or cuda (only decides what is reported)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=60, help="steps to measure up to (the phase is longer)")
    p.add_argument("--rows", type=int, default=16, help="global batch rows")
    p.add_argument("--micro-rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=3600.0,
                   help="stop the run after this many seconds and report the windows finished by then")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="megatron's distributed optimizer, as the shipped mmBERT configs train")
    p.add_argument("--overlap", action="store_true",
                   help="parallel.overlap_grad_reduce (and overlap_param_gather with --distributed-optimizer)")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="model.recompute (full: one layer per checkpoint, megatron's uniform method)")
    p.add_argument("--save", default="none", choices=["none", "sync", "async"],
                   help="one checkpoint at the last measured step, written synchronously or with "
                        "checkpoint.async_save; report what it cost the step")
    p.add_argument("--log", help="write the training run's output here (default: in the work folder)")
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    from megatron_mmbert.config import model_preset

    start = time.monotonic()
    work = tempfile.mkdtemp(prefix="mmbert-train-bench-")
    vocab = args.vocab or model_preset(args.preset).vocab_size
    phase_tokens = 4 * args.steps * args.rows * args.seq_len  # never reached: no phase-end evaluation or save
    if args.manifest:
        manifest, corpus = args.manifest, f"shards {args.manifest}"
    elif args.corpus == "gettext":
        manifest, corpus = build_demo_data(work), "gettext demo corpus"
    else:
        manifest, corpus = build_synthetic_data(work, vocab, phase_tokens), "synthetic random-token corpus"
    config = {
        "inherit": os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"),
        "run_dir": f"{work}/run",
        "model": {"preset": args.preset, "vocab_size": vocab, "recompute": args.recompute},
        "precision": args.precision,
        "parallel": {"tensor_parallel": 1, "pipeline_parallel": 1, "use_distributed_optimizer": args.distributed_optimizer,
                     "overlap_grad_reduce": args.overlap,
                     "overlap_param_gather": args.overlap and args.distributed_optimizer},
        "data": {"manifest": manifest, "cache_dir": f"{work}/index", "packing": "best_fit"},
        "phases": [{"name": "pretrain", "tokens": phase_tokens, "seq_len": args.seq_len, "mask_rate": 0.3,
                    "languages": "all", "temperature": 0.7}],
        "optimizer": {"name": "stable_adamw", "clip_grad": 0},
        "schedule": {"total_tokens": phase_tokens, "phases": {"pretrain": {"lr": 1.0e-3, "warmup_tokens": 0}}},
        "batch": {"global_batch_size": args.rows, "micro_batch_size": args.micro_rows,
                  "rampup_start_rows": None, "rampup_increment_rows": None, "rampup_tokens": 0},
        "checkpoint": {"every_steps": 0 if args.save == "none" else args.steps, "keep_phase_ends": False,
                       "keep_last": 1, "async_save": args.save == "async"},
        "logging": {"interval": args.interval, "eval_interval": 0, "tensorboard": False},
    }
    import yaml

    cfg_path = f"{work}/bench.yaml"
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           os.path.join(ROOT, "pretrain_mmbert.py"), "--config", cfg_path]
    env = dict(os.environ, PYTHONPATH=python_path(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log_path = args.log or f"{work}/train.log"
    print(f"training run: {' '.join(cmd)} (output: {log_path})", flush=True)
    windows, why = run_training(cmd, env, f"{work}/run/metrics.jsonl", args.steps,
                                args.time_limit - (time.monotonic() - start), log_path, wait_for_save=args.save != "none")
    print(f"run stopped: {why}", flush=True)
    measured = [w for w in windows[1:] if w["step"] <= args.steps]  # skip start-up (and the steps after the save)
    if not measured:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-6000:]
        sys.exit(f"no measured window ({len(windows)} window(s) written; {why}); the run's output ends:\n{tail}")
    keys = ("time_data_s", "time_forward_backward_s", "time_optimizer_s", "time_step_s", "time_other_s")
    total = {k: sum(w[k] for w in measured) for k in keys}
    wall = total["time_data_s"] + total["time_step_s"] + total["time_other_s"]
    measured_steps = measured[-1]["step"] - windows[0]["step"]
    tps = measured_steps * args.rows * args.seq_len / wall
    outside = wall - total["time_forward_backward_s"]
    mfu = [w["mfu"] for w in measured if w.get("mfu") is not None]
    mfu_text = f"{100 * sum(mfu) / len(mfu):.1f}%" if mfu else "n/a"
    share = lambda k: 100.0 * total[k] / wall  # noqa: E731
    lines = [
        f"\n## Training throughput ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {machine(args.device)}; {args.nproc} process(es); {args.precision}",
        f"- command: `python benchmarks/train_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- run: preset {args.preset}, vocab {vocab}, {args.rows} rows x {args.seq_len} tokens per step "
        f"({args.micro_rows} rows per micro-batch), 30% masking, best_fit packing, {corpus}; StableAdamW, "
        f"{'distributed' if args.distributed_optimizer else 'plain'} optimizer"
        f"{', overlapped gradient reduce / parameter gather' if args.overlap else ''}"
        f"{f', {args.recompute} recompute' if args.recompute != 'none' else ''}"
        f"{'' if args.save == 'none' else ', one ' + ('asynchronous' if args.save == 'async' else 'synchronous') + ' checkpoint'}; "
        f"{measured_steps} measured steps after the first log window ({why})",
        "",
        "| tokens/s | forward+backward | optimizer | data | other (logging, bookkeeping) | outside fwd/bwd | MFU | peak memory |",
        "|---|---|---|---|---|---|---|---|",
        f"| {tps:,.0f} | {share('time_forward_backward_s'):.1f}% | {share('time_optimizer_s'):.1f}% | "
        f"{share('time_data_s'):.1f}% | {share('time_other_s'):.1f}% | **{100 * outside / wall:.1f}%** | "
        f"{mfu_text} | {max(w['memory_gib'] for w in measured):.2f} GiB |",
        "",
        "Goal: under 10% of the step time outside forward/backward. Forward+backward: GPU time between "
        "CUDA events on a GPU (host time on CPU); optimizer: the rest of the step. Peak memory: CUDA max "
        "allocated, or peak RSS on CPU (rank 0).",
    ]
    if args.save != "none":
        lines += save_lines(f"{work}/run/metrics.jsonl", log_path, windows, args.steps)
    report(lines, args.append)


def save_lines(metrics: str, log_path: str, windows, steps: int):
    """What the save at step ``steps`` cost (``--save``): its published record, or what the log says of
    an asynchronous save still being written when the run was stopped."""
    import re

    records = read_checkpoints(metrics)
    if records and not records[0]["async"]:
        return ["", f"Synchronous checkpoint at step {steps}: the step waited **{records[0]['blocked_s']:.2f} s** "
                    "(planning, files, fsync, SHA-256, publication)."]
    if records:
        r = records[0]
        # the windows of the steps the write overlapped: from the save's step to its publication
        after = [w for w in windows if w["step"] > steps and w["step"] - w["window_steps"] < r["published_at_step"]]
        overlapped = (f"; the {sum(w['window_steps'] for w in after)} step(s) logged after it ran at "
                      f"{sum(w['tokens_per_s'] for w in after) / len(after):,.0f} tokens/s (the first holds "
                      "the wait)") if after else ""
        text = (f"the step waited **{r['blocked_s']:.2f} s** (rank 0: sharded state {r['state_s']:.2f} s, "
                f"megatron-core's planning {r['plan_s']:.2f} s, the copy of {r['bytes'] / 2**30:.2f} GiB to host memory "
                f"{r['copy_s']:.2f} s), the background write took **{r['write_s']:.2f} s** (files, fsync, "
                f"SHA-256), published at step {r['published_at_step']} in {r['finalize_s']:.2f} s"
                + (f" after a forced wait of {r['waited_s']:.2f} s" if r["waited_s"] else "") + overlapped)
    else:
        with open(log_path, errors="replace") as f:
            started = re.findall(r"in the background \(the step waited ([0-9.]+)s: .* copy of ([0-9.]+) MiB", f.read())
        text = (f"the step waited {float(started[0][0]):.2f} s (copy of {float(started[0][1]) / 1024:.2f} GiB to host "
                "memory); not published before the run was stopped (background write time unknown)") if started \
            else "no save started before the run was stopped"
    return ["", f"Asynchronous checkpoint (`checkpoint.async_save`) at step {steps}: {text}."]


if __name__ == "__main__":
    main()
