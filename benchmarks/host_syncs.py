"""Step time with and without the host syncs issue 18 removed from the step path.

Before (the baselines, written out here as they were):

* RoPE on TE's packed THD layout went through megatron-core's ``_apply_rotary_pos_emb_thd``: a
  ``cu_seqlens`` read to the host (``.tolist()``) and a per-document Python loop, for q and k in every
  layer of every micro-batch. Now one rotation with per-token angles (``MMBertSelfAttention``).
* ``GuardedOptimizer.grads_finite`` tested each parameter's gradient with ``bool(isfinite(g).all())``:
  one host read per parameter per step. Now one reduction per DDP grad buffer and one read.

Measured: (1) the RoPE of one micro-batch at mmBERT-base widths (22 layers, 12 x 64 heads) on one
packed 8192-token row of realistic documents, both ways (the TE path, which cannot run without a
GPU, so this is the op alone); (2) a whole training step (megatron DDP, Adam, GuardedOptimizer; SDPA
backend, 1 process) with the old and the new ``grads_finite``, and the check alone. On a CPU a host
read costs only its Python overhead; on a GPU each one also drains the launch queue, so the CPU
numbers are a lower bound on what the syncs cost.

  python benchmarks/host_syncs.py [--device cuda] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import report, machine as describe_machine  # noqa: E402
from benchmarks.model_throughput import timed  # noqa: E402


def packed_documents(total: int, seed: int = 0):
    """Document lengths of a few hundred to a few thousand tokens filling ``total`` tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(200, 3000, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def interleaved_best(before, after, rounds: int, device: torch.device):
    """Best time of each of two functions over ``rounds`` alternating runs (load hits both alike)."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, fn in enumerate((before, after)):
            best[i] = min(best[i], timed(fn, iters=1, device=device))
    return best


def rope_per_micro_batch(device, tokens: int, layers: int, heads: int, head_dim: int, rounds: int):
    """(megatron THD path, per-token) seconds for the q and k rotations of ``layers`` layers."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd, apply_rotary_pos_emb
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mmbert.model.layers import RotaryTable

    lengths = packed_documents(tokens)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    rotary = RotaryTable(head_dim, 160000.0).to(device)
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads)
    q = torch.randn(tokens, 1, heads, head_dim, device=device)
    cp_group = parallel_state.get_context_parallel_group()

    def megatron_thd():
        table = rotary(torch.arange(max(lengths), device=device))
        for _ in range(layers * 2):  # q and k
            _apply_rotary_pos_emb_thd(q.squeeze(1), cu, table, cp_group=cp_group)

    def per_token():
        angles = rotary(positions[None])
        for _ in range(layers * 2):
            apply_rotary_pos_emb(q, angles, config=config)

    megatron_thd(), per_token()  # warm-up
    return (*interleaved_best(megatron_thd, per_token, rounds, device), len(lengths))


def grads_finite_per_parameter(optimizer) -> bool:
    """The pre-issue-18 check (baseline): a host read per parameter, then one all-reduce."""
    grads = []
    for chunk in optimizer._chunks:
        for p in chunk.parameters():
            g = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
            if g is not None:
                grads.append(g)
    bad = torch.zeros(1, dtype=torch.float32, device=grads[0].device)
    for g in grads:
        if not torch.isfinite(g).all():
            bad.fill_(1.0)
            break
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad.item() == 0.0)


def training_step_times(device, preset: str, rows: int, seq_len: int, micro_batches: int, rounds: int):
    """(old grads_finite, new grads_finite) seconds per training step, and the parameter count."""
    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig, model_preset
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.training.optim import GuardedOptimizer
    from megatron_mmbert.training.config import OptimizerSection
    from megatron_mmbert.training.step import build_optimizer, train_step, wrap_ddp

    model = model_preset(preset, num_layers=4, vocab_size=4096, attention_output_dropout=0.0)
    parallel = ParallelConfig()
    runtime.initialize(model, parallel, seed=0)
    chunks = wrap_ddp(build_model(model, parallel, device=device), parallel)
    guarded = GuardedOptimizer(build_optimizer(chunks, OptimizerSection(), parallel, lr=1e-4, weight_decay=0.1), chunks)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(micro_batches):
        tokens = torch.randint(5, model.vocab_size, (rows, seq_len), generator=g)
        labels = torch.where(torch.rand(rows, seq_len, generator=g) < 0.3, tokens, torch.full_like(tokens, -100))
        batches.append({"tokens": tokens, "labels": labels, "positions": torch.arange(seq_len).repeat(rows, 1),
                        "cu_seqlens": torch.arange(0, rows * seq_len + 1, seq_len, dtype=torch.int32),
                        "max_seqlen": seq_len})
    n_params = sum(1 for p in chunks[0].parameters())
    new_check = guarded.grads_finite

    def step_with(check):
        def step():
            guarded.grads_finite = check  # what GuardedOptimizer.step calls
            train_step(chunks, guarded, batches, device)

        return step

    old_step, new_step = step_with(lambda: grads_finite_per_parameter(guarded)), step_with(new_check)
    old_step(), new_step()  # warm-up
    old, new = interleaved_best(old_step, new_step, rounds, device)
    check_old = min(timed(grads_finite_per_parameter, guarded, iters=5, device=device) for _ in range(rounds))
    check_new = min(timed(new_check, iters=5, device=device) for _ in range(rounds))
    runtime.shutdown()
    return old, new, check_old, check_new, n_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the packed row for the RoPE timing")
    p.add_argument("--preset", default="mmbert-small", help="widths of the step's model (4 layers, vocab 4096)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    old_step, new_step, check_old, check_new, n_params = training_step_times(
        device, args.preset, args.rows, args.seq_len, args.micro_batches, args.rounds
    )
    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig, model_preset

    runtime.initialize(model_preset("tiny"), ParallelConfig())
    rope_old, rope_new, n_docs = rope_per_micro_batch(device, args.tokens, 22, 12, 64, args.rounds)
    runtime.shutdown()
    ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
    lines = [
        f"\n## Host syncs on the step path, with and without (issue 18) ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {describe_machine(args.device)}; torch {torch.__version__}; fp32; 1 process",
        f"- command: `python benchmarks/host_syncs.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- RoPE: q and k of 22 layers, 12 x 64 heads (mmBERT-base), one packed row of {args.tokens} tokens "
        f"in {n_docs} documents of 200-3000 tokens; megatron-core's THD path vs per-token angles",
        f"- step: {args.preset} width, 4 layers, vocab 4096 ({n_params} parameter tensors), {args.micro_batches} "
        f"micro-batches of {args.rows} x {args.seq_len}, SDPA backend, DDP + Adam + GuardedOptimizer; "
        f"best of {args.rounds}, interleaved",
        "",
        "| measurement | with host syncs (before) | without (now) | ratio |",
        "|---|---|---|---|",
        f"| RoPE of one micro-batch, base widths, {args.tokens} tokens (TE path, the op alone) | {ms(rope_old)} | "
        f"{ms(rope_new)} | {rope_old / rope_new:.2f}x |",
        f"| `grads_finite` ({n_params} parameter tensors) | {ms(check_old)} | {ms(check_new)} | {check_old / check_new:.2f}x |",
        f"| training step (SDPA path: differs in `grads_finite` only) | {ms(old_step)} | {ms(new_step)} | "
        f"{old_step / new_step:.2f}x |",
        "",
        "On a CPU a host read costs only Python overhead; on a GPU each also waits for the queued kernels,"
        " so these are lower bounds for the GPU (`--device cuda` measures them there).",
    ]
    report(lines, args.append)


if __name__ == "__main__":
    main()
