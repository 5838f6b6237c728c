"""Checking a converted model against Hugging Face (``mmbert-convert verify``): the inputs, the HF
reference and :func:`verify`."""

from __future__ import annotations

import dataclasses

import torch

from megatron_mmbert.config_base import ConfigError, check
from megatron_mmbert.convert.config import VERIFY_TOLERANCE, VerifyConfig


def random_packed_batch(vocab: int, rows: int, seq_len: int, seed: int, first_id: int = 5):
    """Rows of random tokens split into random documents (one row is a single long document)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(first_id, vocab, (rows, seq_len), generator=g)
    bounds, positions = [0], []
    for r in range(rows):
        if r == 0:
            lengths = [seq_len]
        else:
            cuts = sorted(torch.randperm(seq_len - 1, generator=g)[:3].add(1).tolist())
            lengths = [b - a for a, b in zip([0] + cuts, cuts + [seq_len])]
        for n in lengths:
            bounds.append(bounds[-1] + n)
            positions.append(torch.arange(n))
    return {
        "tokens": tokens,
        "positions": torch.cat(positions).view(rows, seq_len),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(b - a for a, b in zip(bounds[:-1], bounds[1:])),
    }


def hf_logits_per_document(hf_model, batch) -> torch.Tensor:
    """HF logits for a packed batch, each document run on its own (HF has no packing)."""
    rows, seq_len = batch["tokens"].shape
    flat = batch["tokens"].reshape(-1)
    cu = batch["cu_seqlens"].tolist()
    out = []
    with torch.no_grad():
        for start, end in zip(cu[:-1], cu[1:]):
            ids = flat[start:end][None]
            out.append(hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0])
    return torch.cat(out).reshape(rows, seq_len, -1)


def verify(args: VerifyConfig) -> int:
    """Our model (``args.load`` at ``args.tp`` x ``args.pp``, under torchrun when > 1) against HF's
    (``args.hf_dir``, fp32) on random packed rows; prints the max |logit diff| on rank 0 and returns
    0 within the tolerance, else 1."""
    from transformers import AutoModelForMaskedLM

    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig
    from megatron_mmbert.hub import resolve  # --hf-dir may be a Hub id
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.model.pipeline import forward_logits
    from megatron_mmbert.checkpoints import dist as ckpt

    check(args)  # VerifyConfig.validate: also for options built in Python
    model = ckpt.read_model_config(args.load)
    if args.attention_backend:
        model = dataclasses.replace(model, attention_backend=args.attention_backend)
    tolerance = VERIFY_TOLERANCE[args.precision] if args.tolerance is None else args.tolerance
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    rt = runtime.initialize(model, parallel, seed=args.seed)
    chunks = build_model(model, parallel, args.precision, training=False)
    ckpt.load_model(args.load, chunks, verify=args.verify)
    backend = chunks[0].backend
    if args.precision == "bf16":  # as training runs it: bf16 weights, fp32 RoPE, fp32 logits
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    seq_len = args.seq_len or max(64, 4 * model.local_attention)
    batch = random_packed_batch(model.vocab_size, args.rows, seq_len, args.seed)
    ours = forward_logits(chunks, [batch])
    verdict = torch.zeros(2, dtype=torch.float64)  # [max diff, compared?]
    if ours is not None and rt.tensor_parallel_rank == 0 and rt.data_parallel_rank == 0:
        hf_model = AutoModelForMaskedLM.from_pretrained(resolve(args.hf_dir), attn_implementation="eager").float().eval()
        reference = hf_logits_per_document(hf_model, batch)
        if reference.shape != ours[0].shape:
            raise ConfigError(f"logit shapes differ: HF {tuple(reference.shape)} vs ours {tuple(ours[0].shape)}; "
                              "hf_dir and load are not the same model", field="hf_dir")
        verdict[0] = (ours[0].float() - reference).abs().max().item()
        verdict[1] = 1
    torch.distributed.all_reduce(verdict)
    runtime.shutdown()
    diff = verdict[0].item()
    ok = diff <= tolerance
    if rt.rank == 0:
        print(
            f"verify: max |logit diff| = {diff:.3e} over {args.rows} rows x {seq_len} tokens "
            f"(window {model.local_attention}) at TP{args.tp}/PP{args.pp}, {backend} "
            f"attention, {args.precision}: {'OK' if ok else 'FAIL'} (tolerance {tolerance:g})"
        )
    return 0 if ok else 1
