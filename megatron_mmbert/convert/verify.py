"""Inputs and the HF reference for checking a converted model (``convert_checkpoint.py verify``)."""

from __future__ import annotations

import torch


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
