"""The step's performance knobs change nothing but speed and memory: ``model.recompute``
(megatron-core's selective and full recompute; full also at TP2xPP2 in test_parallel_equivalence's
``tp2_pp2_full_recompute``), ``parallel.overlap_grad_reduce`` / ``overlap_param_gather``
(in test_parallel_equivalence's 4-process layouts: ``dp4_distopt_overlap``)."""

import dataclasses

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import PRESETS, ParallelConfig
from megatron_mmbert.model.build import build_model
from tests.helpers.model import packed_batch
from benchmarks.recompute_memory import saved_activation_bytes  # the benchmark's own measure


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


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_full_recompute_keeps_only_layer_inputs_and_equals_no_recompute(precision):
    """``model.recompute: full`` (megatron-core's checkpoint around whole layers, our masks in its
    closure): the same loss and gradients bit for bit (attention-output dropout on: the RNG states
    are replayed; amp_bf16: the autocast is), the layers run again in the backward, and autograd
    keeps a fraction of the activations. ``uniform`` 3 on 4 layers: chunks of 3 and 1."""
    model = dataclasses.replace(PRESETS["tiny"], num_layers=4, vocab_size=1000, attention_backend="sdpa",
                                attention_output_dropout=0.1)
    parallel = ParallelConfig()
    runtime.initialize(model, parallel, seed=3)
    batch = packed_batch([[40, 24, 64], [128]], 1000, seed=2)
    labels = torch.full_like(batch["tokens"], -100)
    labels[:, ::3] = batch["tokens"][:, ::3]
    variants = {"none": {}, "uniform 1": dict(recompute="full"),
                "uniform 3": dict(recompute="full", recompute_num_layers=3),
                "block 2": dict(recompute="full", recompute_method="block", recompute_num_layers=2)}
    results, reference = {}, None
    for name, knobs in variants.items():
        (m,) = build_model(dataclasses.replace(model, **knobs), parallel, precision)
        if reference is None:
            reference = m.state_dict()
        m.load_state_dict(reference)
        m.train()
        calls = [0]
        for layer in m.encoder.layers:
            layer.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        torch.manual_seed(0)  # the same dropout masks in every variant
        loss, kept = saved_activation_bytes(lambda: m(batch["tokens"], batch["positions"], batch["cu_seqlens"],
                                                       batch["max_seqlen"], labels=labels, loss_reduction="sum"))
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, calls[0], kept)
    loss, grads, calls, kept = results["none"]
    assert calls == 4
    for name in variants:
        other_loss, other_grads, _, _ = results[name]
        assert torch.equal(other_loss, loss), name
        for param, g in grads.items():
            torch.testing.assert_close(other_grads[param], g, rtol=0, atol=0, msg=f"{name}: {param}")
    assert [results[n][2] for n in variants] == [4, 8, 8, 6]  # forwards run: the recomputed layers twice
    sizes = {n: results[n][3] for n in variants}
    assert sizes["uniform 3"] < sizes["uniform 1"] < 0.15 * sizes["none"], sizes
    assert sizes["uniform 1"] < sizes["block 2"] < 0.75 * sizes["none"], sizes
    # Negative control: dropout is on (another seed, another loss), so equal losses above mean the
    # recompute replayed the forward's random state.
    torch.manual_seed(1)
    (m,) = build_model(model, parallel, precision)
    m.load_state_dict(reference)
    m.train()
    other = m(batch["tokens"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"], labels=labels,
              loss_reduction="sum")
    assert not torch.equal(other.detach(), loss)

