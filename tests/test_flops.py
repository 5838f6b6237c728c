"""FLOPs per token against an independent per-layer count for mmBERT-base (Kaplan et al. 2020 / Megatron-LM's 6N + attention convention)."""

import pytest

from megatron_mmbert.config import PRESETS
from megatron_mmbert.flops import flops_per_token, linear_flops_per_token

BASE = PRESETS["mmbert-base"]


@pytest.mark.parametrize(
    "seq_len, mask_rate, sparse, gflops",
    [
        (1024, 0.30, True, 1.109),
        (1024, 0.15, True, 0.931),
        (1024, 0.30, False, 1.937),
        (8192, 0.15, True, 1.460),
        (8192, 0.05, True, 1.341),
        (8192, 0.30, False, 2.465),
    ],
)
def test_anchor_table(seq_len, mask_rate, sparse, gflops):
    assert flops_per_token(BASE, seq_len, mask_rate, sparse_head=sparse) / 1e9 == pytest.approx(gflops, abs=5e-4)


def test_linear_term_is_six_times_encoder_weights():
    assert linear_flops_per_token(BASE) / 1e6 == pytest.approx(661.8, abs=0.05)


def test_attention_uses_document_lengths_not_row_length():
    packed = flops_per_token(BASE, mask_rate=0.3, doc_lengths=[256] * 4)
    one_doc = flops_per_token(BASE, 1024, 0.3)
    assert packed < one_doc
    assert packed == pytest.approx(flops_per_token(BASE, 256, 0.3))
