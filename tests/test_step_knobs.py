"""The step's performance knobs change nothing but speed and memory: ``model.recompute``
(megatron-core's selective recompute), ``parallel.overlap_grad_reduce`` / ``overlap_param_gather``
(in test_parallel_equivalence's 4-process layouts: ``dp4_distopt_overlap``)."""

import dataclasses

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import PRESETS, ParallelConfig
from megatron_mmbert.model.build import build_model
from tests.helpers.model import packed_batch


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    runtime.shutdown()


def test_selective_recompute_reruns_attention_and_equals_no_recompute():
    model = dataclasses.replace(PRESETS["tiny"], num_layers=3, vocab_size=1000, attention_backend="sdpa")
    parallel = ParallelConfig()
    runtime.initialize(model, parallel, seed=3)
    (plain,) = build_model(model, parallel, "amp_bf16")
    (recomputed,) = build_model(dataclasses.replace(model, recompute="selective"), parallel, "amp_bf16")
    recomputed.load_state_dict(plain.state_dict())
    batch = packed_batch([[40, 24], [64]], 1000, seed=2)
    labels = torch.full_like(batch["tokens"], -100)
    labels[:, ::3] = batch["tokens"][:, ::3]
    results = []
    for m in (plain, recomputed):
        m.train()
        calls = [0]
        for layer in m.encoder.layers:
            layer.self_attention.core_attention.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        torch.manual_seed(0)  # the same dropout masks in both (the recompute replays its own)
        loss = m(batch["tokens"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"], labels=labels,
                 loss_reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, calls[0]))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    assert calls_a == 3 and calls_b == 6  # the backward ran each layer's attention again
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=0, atol=0, msg=name)
