"""RoPE frequencies stay exact under megatron-core's bf16 wrapper.

``Float16Module`` (what ``training.step.wrap_ddp`` applies for bf16) calls ``.bfloat16()`` on the
model, buffers included. Rounded to bf16, the rotary frequencies put the angle of position 8191 off by
radians, and the model a bf16 run trains is not the one fp32 evaluation and the HF export compute.
These tests go through the real path: megatron-core's Float16Module and DDP on the CPU adapter.
"""

import numpy as np
import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import ParallelConfig
from megatron_mmbert.convert.checkpoints import import_hf
from megatron_mmbert.model.build import build_model
from megatron_mmbert.model.pipeline import _unwrap, forward_logits
from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.training.step import wrap_ddp
from tests.helpers.model import make_hf_model, packed_batch

# mmBERT's head size (64) and mid-training theta (160k) on a two-layer model; every layer global
# so that each query sees keys up to ~1000 positions away, where frequency errors add up.
ROPE_CONFIG = dict(vocab_size=500, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=2, local_attention=128, global_rope_theta=160000.0,
                   local_rope_theta=10000.0, global_attn_every_n_layers=1)
LONG = 1024  # one document occupying positions 7168..8191 of an 8192-token row
# Relative RMS difference of bf16 logits from fp32 logits. bf16 keeps 8 significant bits
# (2^-9 ~ 0.2% relative rounding per operation); through two layers and the head the measured
# difference is ~1.0% with exact frequencies and ~8% with bf16-rounded ones, so 3% separates them.
LOGITS_TOL = 0.03


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    make_hf_model(ROPE_CONFIG, str(root / "hf"))
    model = import_hf(str(root / "hf"), str(root / "ckpt"))
    runtime.shutdown()
    return str(root / "ckpt"), model


def _model(checkpoint, precision):
    """The imported model at ``precision``, wrapped as training wraps it (Float16Module for bf16)."""
    ckpt_dir, model = checkpoint
    parallel = ParallelConfig()
    runtime.initialize(model, parallel)
    chunks = build_model(model, parallel, precision)
    ckpt.load_model(ckpt_dir, chunks)
    return wrap_ddp(chunks, parallel, precision) if precision == "bf16" else chunks


def _long_document(model):
    batch = packed_batch([[LONG]], model.vocab_size, seed=3)
    batch["positions"] = batch["positions"] + (8192 - LONG)
    return batch


def test_bf16_wrapped_angles_match_float64(checkpoint_dir):
    _, model = checkpoint_dir
    try:
        chunks = _model(checkpoint_dir, "bf16")
        inner = _unwrap(chunks[0])
        assert inner.embedding.word_embeddings.weight.dtype == torch.bfloat16  # the wrapper did cast
        inner.set_rope_theta(160000.0, 10000.0)  # a phase transition, after the cast
        d = model.head_dim
        for table, theta in ((inner.global_rotary, 160000.0), (inner.local_rotary, 10000.0)):
            assert table.inv_freq.dtype == torch.float32
            reference = 8191 * theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
            angles = table(torch.tensor([8191]))[0, 0, 0].double().numpy()
            np.testing.assert_allclose(angles[: d // 2], reference, rtol=0, atol=1e-3)
            np.testing.assert_array_equal(angles[d // 2 :], angles[: d // 2])
    finally:
        runtime.shutdown()


def test_bf16_logits_at_long_positions_track_fp32(checkpoint_dir):
    _, model = checkpoint_dir
    batch = _long_document(model)
    try:
        fp32 = forward_logits(_model(checkpoint_dir, "fp32"), [batch])[0].float()
    finally:
        runtime.shutdown()
    try:
        chunks = _model(checkpoint_dir, "bf16")
        bf16 = forward_logits(chunks, [batch])[0].float()
        # Negative control: the frequencies the old buffer held after the cast (bf16-rounded).
        inner = _unwrap(chunks[0])
        for table in (inner.global_rotary, inner.local_rotary):
            table.inv_freq = table.inv_freq.bfloat16()
        rounded = forward_logits(chunks, [batch])[0].float()
    finally:
        runtime.shutdown()

    def relative_rms(x):
        return ((x - fp32).norm() / fp32.norm()).item()

    assert relative_rms(bf16) < LOGITS_TOL
    assert relative_rms(rounded) > LOGITS_TOL
