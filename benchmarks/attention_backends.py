"""Core attention of one global + one local layer, per backend: forward+backward time and peak memory.

The shipped kernels (``model/attention.py``) on the same packed micro-batch and the same q/k/v:

* ``sdpa``: PyTorch SDPA on ``[b, s]`` rows with ``[b, 1, s, s]`` boolean masks (``segment_masks``);
* ``flex``: FlexAttention on the packed tokens with the ``BlockMask`` s of ``document_block_mask``
  (compiled on CUDA; on CPU eager and forward-only: torch has no FlexAttention backward there);
* ``flash``: flash-attn 2's ``flash_attn_varlen_func`` (CUDA, bf16, where ``flash_attn`` imports).

TransformerEngine's kernels are not measured here (no machine this project checks on has TE; the
training benchmarks pick TE up through the model where it exists).

Widths are mmBERT-base's (12 heads of 64, window 128). Rows are packed as in pre-training: documents
of a few hundred to a few thousand tokens (uniform in [200, 3000], the last one cut at the row end).
Per micro-batch, the masks are built once (their time is reported separately: the model shares them
across its 22 layers), then the global and the local layer each run forward and backward. Each
backend's output is checked against SDPA's (max |diff|).

  python benchmarks/attention_backends.py --append                    # CPU, reduced sizes
  python benchmarks/attention_backends.py --device cuda --append      # 1024 and 8192-token rows
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import PeakRSS, append_results, machine as describe_machine  # noqa: E402


def packed_rows(rows: int, seq_len: int, seed: int = 0):
    """Positions and ``cu_seqlens`` of ``rows`` rows of ``seq_len`` tokens, documents of 200-3000."""
    g = torch.Generator().manual_seed(seed)
    bounds, positions = [0], []
    for _ in range(rows):
        left = seq_len
        while left:
            n = min(left, int(torch.randint(200, 3001, (1,), generator=g)))
            positions.append(torch.arange(n))
            bounds.append(bounds[-1] + n)
            left -= n
    return torch.cat(positions).view(rows, seq_len), torch.tensor(bounds, dtype=torch.int32)


def build_layers(backend: str, precision: str, device: torch.device):
    """The backend's core-attention modules for a global (layer 1) and a local (layer 2) layer."""
    from megatron_mmbert.config import ParallelConfig, model_preset
    from megatron_mmbert.model import attention
    from megatron_mmbert.model.build import transformer_config

    model = model_preset("mmbert-base", attention_dropout=0.0)
    config = transformer_config(model, ParallelConfig(), precision, backend=backend)
    cls = {"sdpa": attention.SDPAAttention, "flex": attention.FlexAttention, "flash": attention.FlashVarlenAttention}[backend]
    layers = [cls(config, layer_number=n).to(device) for n in (1, 2)]
    assert not layers[0].is_local and layers[1].is_local
    return model, layers


def run_pair(backend, model, layers, qkv, positions, cu, backward: bool):
    """Masks for the micro-batch, then the global and local layer (forward, and backward): returns
    (output of each layer as [t, heads * d], mask seconds)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_mmbert.model.attention import document_block_mask, segment_masks

    b, s, heads, d = qkv[0].shape
    t = b * s
    start = time.perf_counter()
    packed = None
    if backend == "sdpa":
        masks = segment_masks(cu, positions, model.local_attention)
        inputs = [x.transpose(0, 1) for x in qkv]  # [s, b, heads, d]
    else:
        inputs = [x.reshape(t, heads, d) for x in qkv]
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=int(s), max_seqlen_kv=int(s))
        masks = (None, None)
        if backend == "flex":
            masks = (document_block_mask(cu, t, None), document_block_mask(cu, t, model.local_attention // 2))
    mask_seconds = time.perf_counter() - start
    outs = []
    for layer, mask in zip(layers, masks):
        out = layer(*inputs, mask, packed_seq_params=packed)
        if backward:
            out.float().square().mean().backward()
        out = out.detach()
        outs.append(out.reshape(s, b, -1).transpose(0, 1).reshape(t, -1) if backend == "sdpa" else out)
    return outs, mask_seconds


def measure(backend, precision, device, rows, seq_len, iters, backward: bool, reference: Optional[List[torch.Tensor]]):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, layers = build_layers(backend, precision, device)
    heads, d = model.num_attention_heads, model.head_dim
    positions, cu = packed_rows(rows, seq_len)
    positions, cu = positions.to(device), cu.to(device)
    g = torch.Generator().manual_seed(1)
    qkv = [torch.randn(rows, seq_len, heads, d, generator=g).to(device, dtype).requires_grad_(backward) for _ in range(3)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    start = time.perf_counter()
    outs, _ = run_pair(backend, model, layers, qkv, positions, cu, backward)  # warm-up (and compile)
    sync()
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss = None
    best, mask_best = float("inf"), float("inf")
    for i in range(iters):
        for x in qkv:
            x.grad = None
        sync()
        start = time.perf_counter()
        if device.type != "cuda" and i == 0:  # the first timed pass (sampling costs a little time)
            with PeakRSS() as rss:
                _, mask_seconds = run_pair(backend, model, layers, qkv, positions, cu, backward)
        else:
            _, mask_seconds = run_pair(backend, model, layers, qkv, positions, cu, backward)
        sync()
        best, mask_best = min(best, time.perf_counter() - start), min(mask_best, mask_seconds)
    memory = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else rss.bytes
    diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, reference)) if reference else 0.0
    kernel = {"sdpa": "SDPA, [b, 1, s, s] masks", "flex": "FlexAttention " + ("compiled" if device.type == "cuda" else "eager"),
              "flash": "flash-attn 2 varlen"}[backend]
    return {"backend": backend, "kernel": kernel, "seconds": best, "mask_seconds": mask_best, "memory": memory,
            "diff": diff, "first": first, "backward": backward, "outs": outs}


def available(device: torch.device, precision: str) -> List[str]:
    import importlib.util

    names = ["sdpa"]
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        names.append("flex")
    if device.type == "cuda" and precision == "bf16" and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", default=None,
                   help="rows x seq_len pairs, e.g. 16x1024,2x8192 (default: that on CUDA, 4x256,1x2048 on CPU)")
    p.add_argument("--backends", default=None, help="comma-separated subset (default: every one available)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shapes = args.shapes or ("16x1024,2x8192" if device.type == "cuda" else "4x256,1x2048")
    backends = args.backends.split(",") if args.backends else available(device, precision)
    if "sdpa" not in backends:
        backends.insert(0, "sdpa")  # the reference every other backend is compared with
    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig, model_preset

    runtime.initialize(model_preset("mmbert-base"), ParallelConfig())  # megatron's RNG tracker and groups
    table: List[Dict] = []
    try:
        for shape in shapes.split(","):
            rows, seq_len = (int(x) for x in shape.lower().split("x"))
            reference = None
            for backend in backends:
                # On CPU every backend runs forward only (FlexAttention has no CPU backward), and
                # SDPA once more with backward, for scale.
                for backward in [True] if device.type == "cuda" else ([False, True] if backend == "sdpa" else [False]):
                    r = measure(backend, precision, device, rows, seq_len, args.iters, backward, reference)
                    reference = reference or r["outs"]
                    del r["outs"]
                    r.update(rows=rows, seq_len=seq_len)
                    table.append(r)
                    print({k: v for k, v in r.items()}, flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        runtime.shutdown()

    memory_name = "peak memory above inputs" if device.type == "cuda" else "peak RSS above inputs (sampled)"
    lines = [
        f"\n## Attention backends: one global + one local layer, fwd+bwd ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {describe_machine(args.device)}; torch {torch.__version__}; {precision}",
        f"- command: `python benchmarks/attention_backends.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "- mmBERT-base widths (12 heads x 64, window 128); documents of 200-3000 tokens packed into rows; "
        f"best of {args.iters}; masks built once per micro-batch (their time included in the pair's)",
        "- anchor: SDPA with boolean masks (the fallback path); ratio = SDPA time / backend time, same pass",
        "",
        f"| rows x tokens | backend | kernel | pass | pair ms | of which masks ms | {memory_name} MB | first call s | max abs diff vs SDPA | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        anchor = next(x for x in table if x["backend"] == "sdpa" and x["backward"] == r["backward"]
                      and x["rows"] == r["rows"] and x["seq_len"] == r["seq_len"])
        lines.append(
            f"| {r['rows']} x {r['seq_len']} | {r['backend']} | {r['kernel']} | {'fwd+bwd' if r['backward'] else 'fwd only'} "
            f"| {1e3 * r['seconds']:.1f} | {1e3 * r['mask_seconds']:.1f} | {r['memory'] / 2**20:.1f} | {r['first']:.1f} "
            f"| {r['diff']:.1e} | {anchor['seconds'] / r['seconds']:.2f}x |"
        )
    if device.type != "cuda":
        lines.append("\nOn CPU FlexAttention runs eager and forward-only (torch has no CPU backward for it); "
                     "its eager path computes the whole [t, t] score matrix of the packed micro-batch.")
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results(text)


if __name__ == "__main__":
    main()
