"""Model FLOPs per token for MFU, the convention of Megatron-LM / PaLM (6 FLOPs per parameter per token plus attention).

Training FLOPs = 3 x forward (forward + backward, no recompute), 2 FLOPs per multiply-add:

* encoder linears: ``6 * N_enc`` with ``N_enc = L * (4 d^2 + 3 d I)`` (QKV, output, GeGLU fc1/fc2);
* core attention, bidirectional (no causal halving): ``12 * d * keys`` per token, where a global
  layer sees the whole *document* (not the packed row) and a local layer at most ``W`` keys;
* the MLM head on the fraction ``p`` of tokens it runs on (the mask rate with sparse prediction):
  ``6 * (d^2 + d * V) * p``. The input-embedding gather is free; its gradient comes through the tied
  decoder, which the head term already counts.

megatron's own ``num_floating_point_operations`` assumes causal attention and logits for every
token, so it is not used.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from megatron_mmbert.config import ModelConfig


def linear_flops_per_token(model: ModelConfig) -> float:
    d, i, n = model.hidden_size, model.intermediate_size, model.num_layers
    return 6.0 * n * (4 * d * d + 3 * d * i)


def attention_flops_per_token(model: ModelConfig, doc_lengths: Sequence[int]) -> float:
    """Token-weighted mean attention FLOPs over documents of the given lengths."""
    n_global = sum(model.is_global_layer(i) for i in range(model.num_layers))
    n_local = model.num_layers - n_global
    total_tokens = sum(doc_lengths)
    if total_tokens == 0:
        return 0.0
    keys = sum(
        n * (n_global * n + n_local * min(model.local_attention, n)) for n in doc_lengths
    )
    return 12.0 * model.hidden_size * keys / total_tokens


def head_flops_per_token(model: ModelConfig, head_fraction: float) -> float:
    d = model.hidden_size
    return 6.0 * (d * d + d * model.vocab_size) * head_fraction


def flops_per_token(
    model: ModelConfig,
    seq_len: Optional[int] = None,
    mask_rate: float = 0.3,
    doc_lengths: Optional[Iterable[int]] = None,
    sparse_head: bool = True,
) -> float:
    """Training FLOPs per token; give ``seq_len`` (one document per row) or ``doc_lengths``."""
    if doc_lengths is None:
        if seq_len is None:
            raise ValueError("flops_per_token needs seq_len or doc_lengths")
        doc_lengths = [seq_len]
    lengths = list(doc_lengths)
    return (
        linear_flops_per_token(model)
        + attention_flops_per_token(model, lengths)
        + head_flops_per_token(model, mask_rate if sparse_head else 1.0)
    )


# Dense bf16 peak of the GPUs we report MFU for (TFLOP/s, without sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None
