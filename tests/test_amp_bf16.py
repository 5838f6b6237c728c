"""precision amp_bf16 (mmBERT's Composer ``amp_bf16``, the shipped configs' choice): fp32 parameters,
GEMMs in bf16 under autocast, an fp32 residual stream; the loss follows the fp32 model's, and one
training step through megatron's DDP and distributed optimizer keeps everything fp32."""

import dataclasses

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import PRESETS, ParallelConfig
from megatron_mmbert.model.build import build_model
from megatron_mmbert.training.config import OptimizerSection
from megatron_mmbert.training.step import build_optimizer, train_step, wrap_ddp

from tests.helpers.model import packed_batch


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    runtime.shutdown()


def _batch(vocab):
    batch = packed_batch([[40, 24], [64]], vocab, seed=2)
    labels = torch.full_like(batch["tokens"], -100)
    labels[:, ::3] = batch["tokens"][:, ::3]
    return dict(batch, labels=labels)


def test_amp_bf16_residual_stream_is_fp32_and_loss_follows_fp32():
    model = dataclasses.replace(PRESETS["tiny"], num_layers=3, vocab_size=1000)
    parallel = ParallelConfig(use_distributed_optimizer=True)
    runtime.initialize(model, parallel, seed=3)
    (fp32,) = build_model(model, parallel, "fp32")
    (amp,) = build_model(model, parallel, "amp_bf16")
    amp.load_state_dict(fp32.state_dict())
    assert all(p.dtype == torch.float32 for p in amp.parameters())
    stream, gemm = [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: stream.append(o[0] if isinstance(o, tuple) else o))
             for layer in amp.encoder.layers]
    hooks.append(amp.encoder.layers[1].mlp.linear_fc2.register_forward_hook(
        lambda m, i, o: gemm.append(o[0] if isinstance(o, tuple) else o)))
    b = _batch(model.vocab_size)
    args = (b["tokens"], b["positions"], b["cu_seqlens"], b["max_seqlen"])
    loss_amp = amp(*args, labels=b["labels"]).mean()
    loss_fp32 = fp32(*args, labels=b["labels"]).mean()
    for h in hooks:
        h.remove()
    assert [t.dtype for t in stream] == [torch.float32] * 3  # the residual stream between layers
    assert gemm[0].dtype == torch.bfloat16  # the GEMMs ran in bf16
    assert loss_amp.dtype == torch.float32 and torch.isfinite(loss_amp)
    assert abs(loss_amp.item() - loss_fp32.item()) < 0.02 * loss_fp32.item()
    assert loss_amp.item() != loss_fp32.item()  # bf16 GEMMs did run


def test_amp_bf16_trains_with_the_distributed_optimizer():
    model = dataclasses.replace(PRESETS["tiny"], num_layers=2, vocab_size=1000)
    parallel = ParallelConfig(use_distributed_optimizer=True)
    runtime.initialize(model, parallel, seed=3)
    chunks = wrap_ddp(build_model(model, parallel, "amp_bf16"), parallel, "amp_bf16")
    optimizer = build_optimizer(chunks, OptimizerSection(name="stable_adamw", clip_grad=0.0), parallel,
                                lr=1e-3, weight_decay=0.1, precision="amp_bf16")
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    b = _batch(model.vocab_size)
    losses = [train_step(chunks, optimizer, [b]).loss for _ in range(3)]
    assert all(p.dtype == torch.float32 for p in chunks[0].parameters())
    assert all(not torch.equal(before[n], p) for n, p in chunks[0].named_parameters() if p.dim() > 1)
    assert losses[-1] < losses[0]
