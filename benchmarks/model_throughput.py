"""Forward+backward tokens/s of our encoder against HF ModernBertForMaskedLM, same weights and batch.

Both sides run in this process on the same device, config and packed batch, interleaved in rounds
(so machine load hits both alike); the best round of each is reported with the ratio.

* ours: megatron-core TransformerBlock with our specs, sparse MLM head, vocab-parallel CE (TP1);
* HF: ``ModernBertForMaskedLM`` with ``attn_implementation="sdpa"``, rows unpadded per document is
  not possible in the sdpa path, so HF gets one document per row of the same total tokens, and
  ``sparse_prediction=True`` (HF's own masked-only head) — the strongest HF configuration.

On a GPU (``--device cuda``) it also reports MFU (FLOPs from megatron_mmbert.flops, dense bf16 peak
of the card). Precisions: bf16 (both models cast to bf16) and amp_bf16 (fp32 weights under bf16
autocast, what the shipped configs train in). ``--runs`` measures several configurations in one
process, so the compiled FlexAttention kernels of one shape serve every run of that shape (a cold
GPU compiles each once, ~40-55 s).

  python benchmarks/model_throughput.py                      # CPU, a small config
  python benchmarks/model_throughput.py --device cuda --precision bf16 --preset mmbert-base
  python benchmarks/model_throughput.py --device cuda --precisions amp_bf16,bf16 \
      --runs mmbert-base:16x1024,mmbert-base:2x8192,mmbert-small:16x1024

``--local-blocks 128,64`` times our model in the first run once per key-block size of the sliding-window
layers' FlexAttention ``BlockMask`` (``model.local_attention_block``; query blocks 128), same weights
and batch, interleaved with the rest: whether 128 x 64 blocks (256 keys read per query block for a
+-64 window instead of 384) pay on this GPU.
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
from benchmarks.common import report, machine as describe_machine  # noqa: E402

PRECISIONS = ("fp32", "bf16", "amp_bf16")


def make_models(model_cfg, device, precision):
    """HF's model and ours with the same weights. ``precision``: fp32; bf16 (both models cast to
    bf16: megatron's Float16Module for ours); amp_bf16 (fp32 weights, bf16 autocast: our model's own
    ``torch.autocast``, HF run under one by :func:`step_hf`)."""
    from transformers import ModernBertForMaskedLM

    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig
    from megatron_mmbert.convert import hf as hf_map
    from megatron_mmbert.model.build import build_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hf_config = hf_map.hf_config_from_model_config(model_cfg)
    hf_config._attn_implementation = "sdpa"
    hf_config.sparse_prediction = True
    torch.manual_seed(0)
    hf = ModernBertForMaskedLM(hf_config).to(device=device, dtype=dtype)
    parallel = ParallelConfig()
    runtime.initialize(model_cfg, parallel)
    (ours,) = build_model(model_cfg, parallel, precision=precision, device=device)
    state = {k: v for k, v in hf.state_dict().items() if k != "decoder.weight"}
    ours.load_state_dict(hf_map.hf_to_megatron(state, model_cfg, ours.padded_vocab_size), strict=False)
    return hf, ours


def make_batch(vocab, rows, seq_len, mask_rate, device):
    from megatron_mmbert.model.encoder import labelled_token_index

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, vocab, (rows, seq_len), generator=g)
    labels = torch.where(torch.rand(rows, seq_len, generator=g) < mask_rate, tokens, torch.full_like(tokens, -100))
    positions = torch.arange(seq_len).repeat(rows, 1)
    cu = torch.arange(0, rows * seq_len + 1, seq_len, dtype=torch.int32)
    # The labelled tokens' indices and count come from the CPU batch, as the training step takes them
    # (training/prefetch.py): no host sync inside the timed step.
    label_index = labelled_token_index(labels)
    batch = dict(tokens=tokens, labels=labels, positions=positions, cu_seqlens=cu, label_index=label_index)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["label_count"] = int(label_index.numel())
    return batch


def step_ours(model, batch, seq_len):
    """The training path: the summed loss (the head's gradient computed in the forward), averaged."""
    loss = model(batch["tokens"], batch["positions"], batch["cu_seqlens"], seq_len, labels=batch["labels"],
                 label_index=batch["label_index"], loss_reduction="sum")
    loss = loss / max(batch["label_count"], 1)
    loss.backward()
    return loss.detach()


def step_hf(model, batch, seq_len, autocast=False):
    with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["tokens"], attention_mask=torch.ones_like(batch["tokens"]), labels=batch["labels"])
    out.loss.backward()


def timed(fn, *args, iters, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def parse_runs(text: str):
    """``PRESET:ROWSxSEQ[:PRECISION],...`` -> ``[(preset, rows, seq_len, precision or None)]``
    (preset ``cpu-small``: the CPU config; no precision: each of ``--precisions``)."""
    runs = []
    for item in text.split(","):
        preset, _, rest = item.strip().partition(":")
        shape, _, precision = rest.partition(":")
        rows, _, seq_len = shape.partition("x")
        if not (preset and rows.isdigit() and seq_len.isdigit()) or (precision and precision not in PRECISIONS):
            raise SystemExit(f"--runs: {item!r} is not PRESET:ROWSxSEQ[:PRECISION] (e.g. mmbert-base:16x1024:bf16; "
                             f"precisions {', '.join(PRECISIONS)})")
        runs.append((preset, int(rows), int(seq_len), precision or None))
    return runs


def local_keys_read(model_cfg, kv_block: int) -> int:
    """Keys a 128-token query block of a local layer reads inside a long document at ``kv_block``."""
    from megatron_mmbert.model.attention import FLEX_BLOCK, document_block_mask

    cu = torch.tensor([0, 8 * FLEX_BLOCK], dtype=torch.int32)
    mask = document_block_mask(cu, 8 * FLEX_BLOCK, model_cfg.local_attention // 2, block=(FLEX_BLOCK, kv_block))
    return int((mask.kv_num_blocks + mask.full_kv_num_blocks)[0, 0, 1:-1].max()) * kv_block


def measure(preset, rows, seq_len, precision, args, argv, local_blocks=()):
    """One configuration: both models built, timed in interleaved rounds, the section reported.
    ``local_blocks``: key-block sizes of the local layers to time our model at (a copy each, same
    weights; empty: the model's own)."""
    from megatron_mmbert.config import ParallelConfig, model_preset
    from megatron_mmbert.flops import flops_per_token, peak_tflops
    from megatron_mmbert.model.attention import FLEX_BLOCK, local_kv_block
    from megatron_mmbert.model.build import build_model

    if preset != "cpu-small":
        model_cfg = model_preset(preset, attention_output_dropout=0.0, attention_backend=args.attention_backend)
    else:  # mmbert-small's width and heads, fewer layers and a smaller vocabulary: CPU-sized
        model_cfg = model_preset("mmbert-small", num_layers=6, vocab_size=32768, attention_output_dropout=0.0,
                                 attention_backend=args.attention_backend)
    device = torch.device(args.device)
    if local_blocks:
        model_cfg = dataclasses.replace(model_cfg, local_attention_block=local_blocks[0])
    hf, ours = make_models(model_cfg, device, precision)
    hf.train()
    ours.train()
    variants = {"ours": ours}  # our model at each local key-block size, the first is "ours"
    for kv in local_blocks[1:]:
        (variants[f"ours kv{kv}"],) = build_model(dataclasses.replace(model_cfg, local_attention_block=kv),
                                                   ParallelConfig(), precision=precision, device=device)
        variants[f"ours kv{kv}"].load_state_dict(ours.state_dict())
        variants[f"ours kv{kv}"].train()
    kv_blocks = {name: local_kv_block(m.model_config.local_attention_block, device) for name, m in variants.items()}
    amp = precision == "amp_bf16"
    batch = make_batch(model_cfg.vocab_size, rows, seq_len, args.mask_rate, device)
    tokens = rows * seq_len
    run_hf = lambda model, batch, seq_len: step_hf(model, batch, seq_len, autocast=amp)  # noqa: E731
    sides = [(name, step_ours, m) for name, m in variants.items()] + [("hf", run_hf, hf)]
    for _, fn, model in sides:  # warm-up (compiles flex on CUDA)
        timed(fn, model, batch, seq_len, iters=1, device=device)
    # Each variant's loss and gradient norm on the warm-up step (one step from the same weights).
    first = {name: (step_ours(m, batch, seq_len).float().item(),
                    torch.stack([p.grad.float().norm() for p in m.parameters() if p.grad is not None]).norm().item())
             for name, m in variants.items() if len(variants) > 1}
    best = {name: float("inf") for name, _, _ in sides}
    for _ in range(args.rounds):
        for name, fn, model in sides:
            best[name] = min(best[name], timed(fn, model, batch, seq_len, iters=args.iters, device=device))
    ours_tps, hf_tps = tokens / best["ours"], tokens / best["hf"]
    flops = flops_per_token(model_cfg, seq_len, args.mask_rate)
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    memory = f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""

    def mfu(tps):
        return f"{100 * tps * flops / (peak * 1e12):.1f}%" if peak else "n/a"

    name = preset if preset != "cpu-small" else "mmbert-small width, 6 layers, vocab 32768"
    lines = [
        f"\n## Model forward+backward throughput vs HF ModernBertForMaskedLM ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {describe_machine(args.device)}; torch {torch.__version__}; {precision}; our attention: {ours.backend}",
        f"- command: `python benchmarks/model_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- config: {name}; batch {rows} x {seq_len} tokens, mask rate {args.mask_rate}; "
        f"HF: sdpa, sparse_prediction=True{', under the same bf16 autocast' if amp else ''}; "
        f"best of {args.rounds} rounds x {args.iters} steps, interleaved{memory}",
        "",
        "| side | tokens/s | TFLOP/s | MFU |",
        "|---|---|---|---|",
    ]
    for name in variants:
        tps = tokens / best[name]
        label = "megatron-mmbert" + (f", local blocks {FLEX_BLOCK} x {kv_blocks[name]} ({local_keys_read(model_cfg, kv_blocks[name])} "
                                     "keys read per query block)" if len(variants) > 1 else "")
        lines.append(f"| {label} | {tps:,.0f} | {tps * flops / 1e12:.3f} | {mfu(tps)} |")
    lines += [
        f"| HF ModernBertForMaskedLM | {hf_tps:,.0f} | {hf_tps * flops / 1e12:.3f} | {mfu(hf_tps)} |",
        "",
        f"Ratio ours / HF: **{ours_tps / hf_tps:.2f}x** (goal: >= 1.0x on CPU, >= 1.5x and 35% MFU on a GPU).",
    ]
    for name in list(variants)[1:]:
        lines.append(f"Local blocks {FLEX_BLOCK} x {kv_blocks[name]} / {FLEX_BLOCK} x {kv_blocks['ours']}: "
                     f"**{best['ours'] / best[name]:.2f}x** the step rate"
                     + ("" if ours.backend == "flex" else f" (our attention is {ours.backend}: no blocks, the same kernel)")
                     + f"; loss {first[name][0]:.6f} vs {first['ours'][0]:.6f}, gradient norm (two passes accumulated) "
                     f"{first[name][1]:.6g} vs {first['ours'][1]:.6g} (equal up to the kernels' rounding).")
    report(lines, args.append)
    del hf, ours, variants, sides
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default: a small CPU config)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--runs", default=None,
                   help="several configurations in this one process, PRESET:ROWSxSEQ[:PRECISION],... (e.g. "
                        "mmbert-base:16x1024,mmbert-base:2x8192:amp_bf16): compiled kernels are shared "
                        "between them; overrides --preset/--rows/--seq-len")
    p.add_argument("--precisions", default=None,
                   help="comma-separated precisions, each run at each (overrides --precision)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "te", "flash", "flex", "sdpa"],
                   help="our model's attention kernel (auto: what training would pick here)")
    p.add_argument("--local-blocks", default=None,
                   help="comma-separated key-block sizes of the local layers' FlexAttention masks (e.g. 128,64): "
                        "the first run times our model at each (model.local_attention_block)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--mask-rate", type=float, default=0.3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for all runs: a run starts only if 1.2x the longest so far is left "
                        "(the others are named as not run), so a limited call ends with its sections")
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    runs = parse_runs(args.runs) if args.runs else [(args.preset or "cpu-small", args.rows, args.seq_len, None)]
    precisions = args.precisions.split(",") if args.precisions else [args.precision]
    for precision in precisions:
        if precision not in PRECISIONS:
            raise SystemExit(f"--precisions: {precision!r} is not one of {PRECISIONS}")
    local_blocks = [int(x) for x in args.local_blocks.split(",")] if args.local_blocks else []
    start, longest = time.monotonic(), 0.0
    for preset, rows, seq_len, own in runs:  # results appear one section at a time: a cut-off run keeps them
        for precision in [own] if own else precisions:
            left = args.time_limit - (time.monotonic() - start) if args.time_limit else None
            if left is not None and left < 1.2 * longest:
                print(f"not run: {preset} {rows}x{seq_len} {precision} ({left:.0f}s left of --time-limit, "
                      f"the longest run so far took {longest:.0f}s)", flush=True)
                continue
            began = time.monotonic()
            measure(preset, rows, seq_len, precision, args, argv, local_blocks)
            local_blocks = []  # the first run only
            longest = max(longest, time.monotonic() - began)
    from megatron_mmbert import runtime

    runtime.shutdown()


if __name__ == "__main__":
    main()
