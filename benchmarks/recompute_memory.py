"""Activation memory and step time of ``model.recompute``: none, selective, full (uniform / block).

One training forward+backward of the same model, weights and packed batch per setting
(``model/recompute.py``). Reported per setting:

* saved activations: the bytes of the distinct tensors autograd keeps for the backward (parameters
  left out), counted with ``torch.autograd.graph.saved_tensors_hooks`` during the forward -- what
  recompute exists to shrink, independent of the allocator;
* peak memory of the forward+backward above its start: CUDA's allocator peak, or on CPU the
  process's resident memory sampled every millisecond (``common.PeakRSS``);
* step time (best of ``--iters``) and the loss, which must be the same in every row.

Anchor: no recompute, same pass; ratio = the setting's saved bytes / no recompute's.

  python benchmarks/recompute_memory.py --append                     # CPU: mmbert-small width
  python benchmarks/recompute_memory.py --device cuda --preset mmbert-base --rows 16 --append
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import PeakRSS, machine as describe_machine, report  # noqa: E402

SETTINGS = {
    "none": {},
    "selective": dict(recompute="selective"),
    "full, uniform 1": dict(recompute="full", recompute_method="uniform", recompute_num_layers=1),
    "full, uniform 2": dict(recompute="full", recompute_method="uniform", recompute_num_layers=2),
    "full, block half": dict(recompute="full", recompute_method="block"),  # recompute_num_layers: half the layers
}


def saved_activation_bytes(run):
    """``run()`` with every tensor autograd saves for the backward recorded: (its result, bytes of
    the distinct storages saved, parameters left out)."""
    kept = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(kept.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="mmbert-small")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary (smaller than 256000 on CPU: the head is not what recompute changes)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--precision", default="amp_bf16", choices=["fp32", "bf16", "amp_bf16"])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig, model_preset
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.model.encoder import labelled_token_index

    device = torch.device(args.device)
    if device.type == "cpu":
        _return_large_frees_to_the_os()
    model = model_preset(args.preset, vocab_size=args.vocab, attention_output_dropout=0.0)
    parallel = ParallelConfig()
    runtime.initialize(model, parallel, seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, args.vocab, (args.rows, args.seq_len), generator=g)
    labels = torch.where(torch.rand(tokens.shape, generator=g) < 0.3, tokens, torch.full_like(tokens, -100))
    positions = torch.cat([torch.arange(n) for n in (300, args.seq_len - 300)] * args.rows).view(args.rows, -1)
    bounds = [0]
    for _ in range(args.rows):
        bounds += [bounds[-1] + 300, bounds[-1] + args.seq_len]
    cu = torch.tensor(bounds, dtype=torch.int32)
    index = labelled_token_index(labels)
    batch = [x.to(device) for x in (tokens, positions, cu, labels, index)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    rows, weights = [], None
    for name, knobs in SETTINGS.items():
        if knobs.get("recompute_method") == "block":
            knobs = dict(knobs, recompute_num_layers=max(1, model.num_layers // 2))
        (m,) = build_model(dataclasses.replace(model, **knobs), parallel, args.precision, device=device)
        weights = weights or {k: v.clone() if torch.is_tensor(v) else v for k, v in m.state_dict().items()}
        m.load_state_dict(weights)
        m.train()

        def forward():
            tok, pos, cu_, lab, idx = batch
            return m(tok, pos, cu_, args.seq_len, labels=lab, label_index=idx, loss_reduction="sum")

        best, peak, saved, loss = float("inf"), 0, 0, None
        for i in range(args.iters):
            m.zero_grad(set_to_none=True)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            with PeakRSS() if device.type != "cuda" else _NoPeak() as rss:
                out, saved = saved_activation_bytes(forward)
                out.backward()
                sync()
            best = min(best, time.perf_counter() - start)
            used = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.bytes
            peak = used if i == 0 else min(peak, used)
            loss = out.detach().float().item()
        rows.append(dict(name=name, saved=saved, peak=peak, seconds=best, loss=loss))
        print(rows[-1], flush=True)
        del m
    runtime.shutdown()

    anchor = rows[0]
    peak_name = "peak allocated above start" if device.type == "cuda" else "peak RSS above start (sampled)"
    lines = [
        f"\n## Activation recompute: saved activations and peak memory ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {describe_machine(args.device)}; torch {torch.__version__}; {args.precision}",
        f"- command: `python benchmarks/recompute_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- config: {args.preset} ({model.num_layers} layers, hidden {model.hidden_size}), vocab {args.vocab}; "
        f"{args.rows} x {args.seq_len} tokens (documents of 300 and {args.seq_len - 300}), 30% labelled; "
        f"attention {'SDPA' if device.type != 'cuda' else 'auto'}; one training forward+backward, best of {args.iters}",
        "- anchor: no recompute, same model, weights and batch; ratio = saved activations / no recompute's",
        "",
        f"| model.recompute | saved activations MiB | ratio | {peak_name} MiB | step s | loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['saved'] / 2**20:.1f} | {r['saved'] / anchor['saved']:.2f}x "
                     f"| {r['peak'] / 2**20:.0f} | {r['seconds']:.2f} | {r['loss']:.4f} |")
    lines.append("\nEvery loss is the same (recompute replays the forward bit for bit). Full recompute costs one more "
                 "forward of the recomputed layers" + (" (on a shared CPU the step times are noise)." if device.type != "cuda" else "."))
    report(lines, args.append)


def _return_large_frees_to_the_os() -> None:
    """glibc raises its mmap threshold to the size of each large block freed, so after the first
    setting a freed activation stays in the heap and later settings' peaks hide in it; a fixed
    threshold (64 KiB) keeps every large tensor mmap'ed and returned on free (RSS follows the live
    tensors). No-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _NoPeak:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
