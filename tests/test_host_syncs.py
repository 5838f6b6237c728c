"""Host syncs kept off the step path, and what replaced them computes the same thing.

* RoPE on TE's packed (THD) layout: per-token angles rotate q/k exactly as megatron-core's THD path
  (``_apply_rotary_pos_emb_thd``, which reads ``cu_seqlens`` to the host in every layer) did.
* ``GuardedOptimizer.grads_finite``: one host read per step, not one per parameter.
* ``_set_attention_backend``: an SDPA model leaves TE's ``NVTE_*`` switches alone, so SDPA and TE
  models can be built in one process; a conflicting switch is a clear error.

A host read is counted as a call of ``aten::_local_scalar_dense`` (what ``.item()`` and ``bool()``
of a tensor dispatch to; on a GPU each is a device synchronisation).
"""

import os

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import ConfigError, ParallelConfig
from megatron_mmbert.convert.checkpoints import import_hf
from megatron_mmbert.model.backends import set_te_environment, te_environment
from megatron_mmbert.model.build import build_model
from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.training.optim import GuardedOptimizer
from megatron_mmbert.training.config import OptimizerSection
from megatron_mmbert.training.step import build_optimizer, wrap_ddp
from tests.helpers.model import HostReads, make_hf_model, packed_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    make_hf_model("odd", str(root / "hf"))
    model = import_hf(str(root / "hf"), str(root / "ckpt"))
    runtime.shutdown()
    return str(root / "ckpt"), model


@pytest.fixture
def chunks(tiny):
    ckpt_dir, model = tiny
    parallel = ParallelConfig()
    runtime.initialize(model, parallel)
    built = build_model(model, parallel)
    ckpt.load_model(ckpt_dir, built)
    yield built
    runtime.shutdown()


def test_thd_rope_per_token_equals_megatron_thd_path(tiny, chunks):
    """The TE backend's inputs: angles per packed token, applied as one rotation, against megatron's
    per-document THD rotation of the old ``[max_seqlen]`` table."""
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_thd,
        apply_rotary_pos_emb,
    )
    from megatron.core import parallel_state

    _, model = tiny
    chunk = chunks[0]
    batch = packed_batch([[40, 24], [1, 30, 33]], model.vocab_size, seed=3)
    chunk.backend = "te"  # attention_inputs' THD branch (builds PackedSeqParams; needs no TE)
    inputs, packed = chunk.attention_inputs(batch["positions"], batch["cu_seqlens"], batch["max_seqlen"])
    t = batch["tokens"].numel()
    q = torch.randn(t, 1, model.num_attention_heads, model.head_dim)
    for rope, rotary in ((inputs.global_rope, chunk.global_rotary), (inputs.local_rope, chunk.local_rotary)):
        assert rope.shape == (t, 1, 1, model.head_dim) and rope.dtype == torch.float32
        ours = apply_rotary_pos_emb(q, rope, config=chunk.config)
        table = rotary(torch.arange(batch["max_seqlen"]))  # what the TE path used to pass megatron
        reference = _apply_rotary_pos_emb_thd(
            q.squeeze(1), packed.cu_seqlens_q, table, cp_group=parallel_state.get_context_parallel_group()
        )
        torch.testing.assert_close(ours.squeeze(1), reference, rtol=0, atol=1e-6)
    assert not torch.equal(inputs.global_rope, inputs.local_rope)  # thetas differ in this config


def test_grads_finite_reads_the_device_once(tiny, chunks):
    parallel = ParallelConfig()
    wrapped = wrap_ddp(chunks, parallel)
    guarded = GuardedOptimizer(build_optimizer(wrapped, OptimizerSection(), parallel, lr=8e-4, weight_decay=0.1), wrapped)
    params = [p for p in wrapped[0].parameters() if p.requires_grad]
    assert len(params) > 10
    for p in params:
        p.main_grad.normal_()
    HostReads.count = 0
    with HostReads():
        assert guarded.grads_finite()
    assert HostReads.count == 1
    for poisoned in (params[0], params[len(params) // 2], params[-1]):  # wherever it is, it is seen
        for value in (float("nan"), float("inf")):
            saved = poisoned.main_grad.view(-1)[-1].item()
            poisoned.main_grad.view(-1)[-1] = value
            assert not guarded.grads_finite()
            poisoned.main_grad.view(-1)[-1] = saved
    assert guarded.grads_finite()


def test_sdpa_model_leaves_te_switches_alone(tiny, chunks):
    assert not any(k in os.environ for k in te_environment("auto"))


def test_te_switches_per_kernel_set_and_conflicts():
    assert te_environment("auto") == {"NVTE_FLASH_ATTN": "1", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "1"}
    assert te_environment("flash") == {"NVTE_FLASH_ATTN": "1", "NVTE_FUSED_ATTN": "0", "NVTE_UNFUSED_ATTN": "0"}
    environ = {}
    set_te_environment("flash", environ)
    set_te_environment("flash", environ)  # the same model built twice (eval, verify) is fine
    with pytest.raises(ConfigError, match=r"the process has \{'NVTE_FUSED_ATTN': '0'.*unset them"):
        set_te_environment("auto", environ)


def _shipped_optimizer(layers: int):
    """A ``layers``-layer tiny model as the shipped configs train it (amp_bf16, StableAdamW without
    clipping, the distributed optimizer), guarded; its DDP chunks and parameter count."""
    import dataclasses

    from megatron_mmbert.config import PRESETS

    model = dataclasses.replace(PRESETS["tiny"], num_layers=layers, vocab_size=1000)
    parallel = ParallelConfig(use_distributed_optimizer=True)
    runtime.initialize(model, parallel, seed=3)
    wrapped = wrap_ddp(build_model(model, parallel, "amp_bf16"), parallel, "amp_bf16")
    section = OptimizerSection(name="stable_adamw", clip_grad=0.0)
    guarded = GuardedOptimizer(build_optimizer(wrapped, section, parallel, lr=1e-3, weight_decay=0.1,
                                               precision="amp_bf16"), wrapped)
    return wrapped, guarded, sum(1 for _ in wrapped[0].parameters())


def _mlm_batches(count: int):
    batch = packed_batch([[40, 24], [64]], 1000, seed=2)
    labels = torch.full_like(batch["tokens"], -100)
    labels[:, ::3] = batch["tokens"][:, ::3]
    return [dict(batch, labels=labels)] * count


def test_optimizer_step_host_reads_do_not_grow_with_parameters():
    """StableAdamW's step and the logged grad norm: a constant number of host reads (before: one
    per parameter for the element count, one per tensor in megatron's grad-norm fallback)."""
    reads, sizes = [], []
    for layers in (1, 3):
        wrapped, guarded, n = _shipped_optimizer(layers)
        for step in range(2):  # the first step creates the state; the second is a steady one
            for p in wrapped[0].parameters():
                p.main_grad.normal_()
            HostReads.count = 0
            with HostReads():
                ok, _, _ = guarded.step()
                norm = guarded.get_grad_norm()
            assert ok and norm > 0
        reads.append(HostReads.count)
        sizes.append(n)
        runtime.shutdown()
    assert sizes[1] > sizes[0] + 10
    # grads_finite, the clipping statistics, the norm: device reads; the step count: a CPU read per group
    assert reads[0] == reads[1] <= 6, reads


def test_training_step_host_reads_are_a_small_constant():
    """A whole training step (forward/backward of every micro-batch, the optimizer, the report):
    the same few host reads whatever the model depth and the number of micro-batches (the labelled
    tokens are found on the CPU batch, not on the device)."""
    from megatron_mmbert.training.step import train_step

    reads = {}
    for layers in (1, 3):
        wrapped, guarded, _ = _shipped_optimizer(layers)
        for micro in (1, 3):
            train_step(wrapped, guarded, _mlm_batches(micro))
            HostReads.count = 0
            with HostReads():
                result = train_step(wrapped, guarded, _mlm_batches(micro))
            assert result.update_ok and result.tokens > 0
            reads[(layers, micro)] = HostReads.count
        runtime.shutdown()
    assert len(set(reads.values())) == 1 and max(reads.values()) <= 8, reads
