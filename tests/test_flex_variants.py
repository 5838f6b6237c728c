"""Compiled FlexAttention never silently falls back to eager: a run's micro-batches reach it in a few
shapes (evaluation and short micro-batches are padded to the phase's training token count), and its
recompile limit is set for the run and fails loudly when passed.

On CUDA flex is compiled by Inductor; Dynamo decides what is a new variant (a guard failure, a
recompile) before any backend runs, so counting Dynamo's compiled frames with an eager backend on
CPU counts exactly the variants Inductor would compile. On CPU torch refuses FlexAttention's backward
(``_validate_device``); the variant count needs the training calls (grad mode is part of the
guards), so that device check is switched off here -- a test double for the CUDA-only backward, whose
eager (math) implementation then runs.
"""

import pytest
import torch

from megatron_mmbert.model.attention import FLEX_RECOMPILE_LIMIT, document_block_mask, flex_padded_tokens


def _rows(rows: int, seq_len: int, seed: int):
    """``rows`` packed rows of ``seq_len`` tokens, split into documents at random points."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        cuts = sorted(torch.randperm(seq_len - 1, generator=g)[:3].add(1).tolist())
        bounds = [0, *cuts, seq_len]
        out.append([b - a for a, b in zip(bounds, bounds[1:])])
    return out


def _batch(rows: int, seq_len: int, vocab: int, seed: int):
    from tests.helpers.model import packed_batch

    batch = packed_batch(_rows(rows, seq_len, seed), vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch["labels"] = torch.where(torch.rand(batch["tokens"].shape, generator=g) < 0.3, batch["tokens"], -100)
    return batch


@pytest.fixture
def flex_model():
    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig, model_preset
    from megatron_mmbert.model.build import build_model

    model_cfg = model_preset("tiny", attention_backend="flex", attention_output_dropout=0.0)
    runtime.initialize(model_cfg, ParallelConfig())
    try:
        (model,) = build_model(model_cfg, ParallelConfig(), precision="fp32", device=torch.device("cpu"), training=False)
        yield model
    finally:
        runtime.shutdown()


def _forward(model, batch):
    return model(batch["tokens"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"], labels=batch["labels"])


def test_padding_to_the_training_shape_changes_nothing(flex_model):
    """A micro-batch run at a larger token count (a padding document nobody sees) gives the same
    losses and gradients as run at its own."""
    assert flex_padded_tokens(300, None) == 300 and flex_padded_tokens(512, 512) == 512
    assert flex_padded_tokens(256, 512) == 512 and flex_padded_tokens(600, 512) == 1024
    batch = _batch(2, 96, flex_model.vocab_size, seed=3)
    flex_model.eval()
    with torch.no_grad():
        flex_model.set_flex_tokens(None)
        own = _forward(flex_model, batch)
        flex_model.set_flex_tokens(512)  # 192 tokens -> 512: blocks of padding after the last document
        padded = _forward(flex_model, batch)
    torch.testing.assert_close(padded, own, rtol=0, atol=1e-5)
    mask = document_block_mask(batch["cu_seqlens"], 192, None, padded_total=512)
    assert mask.seq_lengths == (512, 512)
    with pytest.raises(ValueError, match="less than the 192 tokens"):
        document_block_mask(batch["cu_seqlens"], 192, None, padded_total=128)


def _run_three_phases(model, monkeypatch, pad: bool):
    """The shapes a three-phase run with evaluations sends to flex (examples/configs/tiny_cpu.yaml:
    micro-batches of 4 rows at 128, 256, 256 tokens; batch-size warm-up and a phase's last step give
    short micro-batches; periodic and phase-end evaluations run 2 rows per language, forward only),
    through flex compiled as on CUDA with a counting backend; returns the compiled variants."""
    import torch.nn.attention.flex_attention as flex_module
    from torch._dynamo.testing import CompileCounter

    from megatron_mmbert.model import attention
    from megatron_mmbert.training.config import load_config
    from tests.helpers.model import ROOT

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = attention.limit_recompiles(torch.compile(flex_module.flex_attention, backend=counter, dynamic=False))
    monkeypatch.setattr(attention, "flex_kernel", lambda device, block=None: compiled)
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args, **kwargs: None)  # CPU backward: see above

    cfg = load_config(f"{ROOT}/examples/configs/tiny_cpu.yaml")
    assert [p.seq_len for p in cfg.phases] == [128, 256, 256]
    seed = 0
    for phase in cfg.phases:
        micro = cfg.phase_micro_batch(phase)
        model.set_flex_tokens(micro * phase.seq_len if pad else None)
        evaluation_rows = cfg.logging.eval_rows_per_language
        # a full step, a short one (warm-up, the phase's last step), an evaluation, a full step again
        for rows, training in ((micro, True), (micro // 2, True), (evaluation_rows, False), (micro, True)):
            seed += 1
            batch = _batch(rows, phase.seq_len, model.vocab_size, seed)
            if training:
                model.train()
                _forward(model, batch).sum().backward()
            else:
                model.eval()
                with torch.no_grad():
                    _forward(model, batch)
    return counter.frame_count


def test_a_three_phase_run_with_evaluations_stays_within_the_recompile_limit(flex_model, monkeypatch):
    """With padding: 4 variants (global/local layers x training/evaluation) per distinct training
    token count (512, 1024), whatever the evaluations and short micro-batches."""
    padded = _run_three_phases(flex_model, monkeypatch, pad=True)
    assert padded == 2 * 2 * 2, padded
    assert padded <= FLEX_RECOMPILE_LIMIT


@pytest.mark.slow  # no process launched; slow: a dozen more Dynamo compilations (~40 s)
def test_without_padding_the_same_run_passes_dynamos_default_limit(flex_model, monkeypatch):
    """The positive control: the same run unpadded needs more variants than Dynamo's default limit
    of 8 -- the silent eager fallback the padding and the run's own limit prevent."""
    unpadded = _run_three_phases(flex_model, monkeypatch, pad=False)
    assert unpadded > 8, unpadded


def test_passing_the_recompile_limit_fails_loudly(monkeypatch):
    """Past the limit the compiled call raises instead of running eager FlexAttention."""
    import torch._dynamo
    import torch.nn.attention.flex_attention as flex_module
    from torch._dynamo.testing import CompileCounter

    from megatron_mmbert.model.attention import limit_recompiles

    torch._dynamo.reset()
    compiled = limit_recompiles(torch.compile(flex_module.flex_attention, backend=CompileCounter(), dynamic=False), limit=2)
    q = [torch.randn(1, 1, t, 16) for t in (128, 256, 384)]
    cu = lambda t: torch.tensor([0, t], dtype=torch.int32)  # noqa: E731
    compiled(q[0], q[0], q[0], block_mask=document_block_mask(cu(128), 128, None))
    compiled(q[1], q[1], q[1], block_mask=document_block_mask(cu(256), 256, None))
    with pytest.raises(Exception, match="(?i)recompile|cache.?size|limit"):
        compiled(q[2], q[2], q[2], block_mask=document_block_mask(cu(384), 384, None))
    assert torch._dynamo.config.recompile_limit == 8  # the process's own setting is untouched
