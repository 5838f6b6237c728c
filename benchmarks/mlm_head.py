"""The MLM head's decoder + cross-entropy, forward and backward, before and after chunking (issue 25).

Before (written out here as it was in ``model/encoder.py``): megatron's ``ColumnParallelLinear``
GEMM over all labelled tokens, the padded columns masked, ``vocab_parallel_cross_entropy(logits.float())``
and the training accuracy's argmax over an fp32 copy -- ``[labelled x vocab]`` logits, their fp32
softmax and their gradient all alive at once. After: ``model/mlm_loss.py`` (chunks of about 32 Mi
logits, gradient computed chunk by chunk in the forward for the summed loss).

Each variant runs in a fresh process: its peak resident memory above what the inputs take (the
decoder weight's gradient included, the same in both) and its best time over a few rounds.

  python benchmarks/mlm_head.py [--vocab 256000] [--hidden 384] [--tokens 4096] [--mask 0.3] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import machine, report  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(variant: str, vocab: int, hidden: int, n: int, rounds: int, dtype: str) -> dict:
    """In this process: inputs, one measured forward+backward (peak RSS), then ``rounds`` timed."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megatron_mmbert import cpu_adapter
    from megatron_mmbert.model.mlm_loss import VocabShard, chunked_cross_entropy

    torch.set_num_threads(max(1, os.cpu_count() // 2))
    cpu_adapter.install()
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % _port(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    g = torch.Generator().manual_seed(0)
    padded = (vocab + 127) // 128 * 128
    h = torch.randn(n, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(padded, hidden, generator=g) * 0.02).requires_grad_(True)
    b = torch.zeros(padded).requires_grad_(True)
    target = torch.randint(0, vocab, (n,), generator=g)
    autocast = dtype == "amp_bf16"

    def old():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = h @ w.t() + b
            ids = torch.arange(padded)
            logits = logits.masked_fill(ids >= vocab, torch.finfo(logits.dtype).min)
            with torch.no_grad():
                correct = (logits.float().max(dim=-1)[1] == target).sum()
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target).sum()
        loss.backward()
        return loss.detach(), correct

    def new():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, correct = chunked_cross_entropy(h, w, b, target, VocabShard(0, vocab), reduction="sum",
                                                  count_correct=True)
        loss.backward()
        return loss.detach(), correct

    fn = old if variant == "old" else new
    before = _rss_mb()
    loss, correct = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    grads = [t.grad.clone() for t in (h, w, b)]
    best = float("inf")
    for _ in range(rounds):
        for t in (h, w, b):
            t.grad = None
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    torch.save({"loss": loss, "grads": grads}, os.environ["MLM_HEAD_OUT"])
    return {"peak_mb": peak, "time_s": best, "loss": float(loss), "correct": int(correct)}


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--hidden", type=int, default=384, help="mmbert-small's width")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the micro-batch (4 x 1024)")
    p.add_argument("--mask", type=float, default=0.3, help="labelled fraction (mmBERT's first phase)")
    p.add_argument("--precision", choices=["fp32", "amp_bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variant", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    n = int(args.tokens * args.mask)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.vocab, args.hidden, n, args.rounds, args.precision)))
        return
    import tempfile

    import torch

    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("old", "new"):
            out = os.path.join(tmp, variant + ".pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--tokens", str(args.tokens), "--mask", str(args.mask),
                   "--precision", args.precision, "--rounds", str(args.rounds)]
            env = dict(os.environ, MLM_HEAD_OUT=out, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            tensors[variant] = torch.load(out)
    old, new = results["old"], results["new"]
    diff_loss = abs(old["loss"] - new["loss"]) / abs(old["loss"])
    diff_grad = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                    for a, b in zip(tensors["new"]["grads"], tensors["old"]["grads"]))
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"\n## MLM head forward+backward, whole-vocabulary logits vs chunked (issue 25) "
        f"({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {machine()}; torch {torch.__version__}; {args.precision}; 1 process",
        f"- command: `python benchmarks/mlm_head.py {argv_text}`",
        f"- vocab {args.vocab}, hidden {args.hidden}, {n} labelled tokens ({args.tokens} x {args.mask}); peak: resident "
        "memory above the inputs (the decoder weight's gradient, the same in both, included); time: best of "
        f"{args.rounds}",
        "",
        "| | before (anchor: the encoder's head as it was) | chunked (now) | ratio |",
        "|---|---|---|---|",
        f"| peak memory | {old['peak_mb']:.0f} MB | {new['peak_mb']:.0f} MB | **{new['peak_mb'] / old['peak_mb']:.2f}x** |",
        f"| time | {old['time_s'] * 1e3:.0f} ms | {new['time_s'] * 1e3:.0f} ms | {new['time_s'] / old['time_s']:.2f}x |",
        "",
        f"Equal results: loss {new['loss']:.6f} vs {old['loss']:.6f} (relative difference {diff_loss:.1e}), "
        f"largest gradient difference {diff_grad:.1e} of the largest gradient, correct predictions "
        f"{new['correct']} vs {old['correct']}. Goal: peak <= 0.25x: "
        f"**{'met' if new['peak_mb'] <= 0.25 * old['peak_mb'] else 'NOT met'}**.",
    ]
    report(lines, args.append)


if __name__ == "__main__":
    main()
