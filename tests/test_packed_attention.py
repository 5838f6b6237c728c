"""The packed (THD) attention kernels' own pieces: FlexAttention's BlockMask from cu_seqlens, and the
flash-attn varlen call (its TEST REFERENCE on CPU, the real kernel wherever flash_attn imports).

End-to-end parity of both backends against HF is in tests/test_model_parity.py.
"""

import importlib.util

import pytest
import torch

from megatron_mmbert.model.attention import document_block_mask
from tests.helpers.flash_reference import reference_flash_attn_varlen_func

# (document lengths, half window or None for global layers, block size): documents shorter and
# longer than a block, a block-aligned and an unaligned total, windows below and above a block.
CASES = [
    ([37, 5, 1, 61, 16], None, 16),
    ([37, 5, 1, 61, 16], 4, 16),
    ([37, 5, 1, 61, 16], 20, 16),
    ([128], 8, 32),
    ([1, 100, 27], 40, 16),
    ([300, 212], 64, 128),
    # (query block, key block): narrower key blocks for sliding windows
    ([300, 212], 64, (128, 64)),
    ([37, 5, 1, 61, 16], 4, (16, 8)),
    ([1, 100, 27], 40, (32, 16)),
    ([128], 8, (32, 16)),
]


def _dense_reference(lengths, half_window):
    """The mask the kernel must realise, token by token, from the document lengths alone."""
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(len(document))
    mask = document[:, None] == document[None, :]
    if half_window is not None:
        mask &= (index[:, None] - index[None, :]).abs() <= half_window
    return mask


def _blocks(counts, indices, n):
    dense = torch.zeros(counts.shape[-1], n, dtype=torch.bool)
    for q, c in enumerate(counts[0, 0].tolist()):
        dense[q, indices[0, 0, q, :c].long()] = True
    return dense


@pytest.mark.parametrize("lengths, half_window, block", CASES)
def test_block_mask_realises_documents_and_window_exactly(lengths, half_window, block):
    from torch.nn.attention.flex_attention import create_block_mask

    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    ours = document_block_mask(cu, total, half_window, block=block)
    q_block, kv_block = (block, block) if isinstance(block, int) else block
    blocks = -(-total // kv_block)
    partial = _blocks(ours.kv_num_blocks, ours.kv_indices, blocks)
    full = _blocks(ours.full_kv_num_blocks, ours.full_kv_indices, blocks)
    assert not (partial & full).any()

    # What a block-sparse kernel computes: full blocks entirely, partial blocks through mask_mod,
    # skipped blocks not at all.
    expand = lambda m: m.repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:total, :total]
    index = torch.arange(total)
    mod = ours.mask_mod(0, 0, index[:, None], index[None, :])
    realised = expand(full) | (expand(partial) & mod)
    assert torch.equal(realised, _dense_reference(lengths, half_window))

    # As sparse as torch's own construction (which evaluates the mask over the whole grid).
    theirs = create_block_mask(ours.mask_mod, 1, 1, total, total, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(full, _blocks(theirs.full_kv_num_blocks, theirs.full_kv_indices, blocks))
    assert torch.equal(partial, _blocks(theirs.kv_num_blocks, theirs.kv_indices, blocks))


def test_block_mask_negative_control():
    """A wrong window or merged documents change the realised mask (the check above can fail)."""
    lengths = [37, 5, 1, 61, 16]
    cu = torch.tensor([0, 37, 42, 43, 104, 120], dtype=torch.int32)
    index = torch.arange(120)
    wrong_window = document_block_mask(cu, 120, 5, block=16).mask_mod(0, 0, index[:, None], index[None, :])
    assert not torch.equal(wrong_window, _dense_reference(lengths, 4))
    merged = document_block_mask(cu[[0, 2, 3, 4, 5]], 120, None, block=16).mask_mod(0, 0, index[:, None], index[None, :])
    assert not torch.equal(merged, _dense_reference(lengths, None))


def _varlen_inputs(dtype, device, heads=4, heads_k=4, dim=32, lengths=(70, 1, 200, 33)):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=g).to(device, dtype)
    k = torch.randn(total, heads_k, dim, generator=g).to(device, dtype)
    v = torch.randn(total, heads_k, dim, generator=g).to(device, dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def test_flash_reference_agrees_with_sdpa_per_document():
    """The test reference is itself checked against PyTorch SDPA run document by document with an
    explicit band mask (windowed, unlimited and causal)."""
    import torch.nn.functional as F

    q, k, v, cu, longest = _varlen_inputs(torch.float64, "cpu")
    for window, causal in (((8, 8), False), ((-1, -1), False), ((-1, -1), True)):
        out = reference_flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, window_size=window, causal=causal)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            i = torch.arange(b - a)
            band = torch.ones(b - a, b - a, dtype=torch.bool)
            if window[0] >= 0:
                band &= (i[:, None] - i[None, :]).abs() <= window[0]
            if causal:
                band &= i[None, :] <= i[:, None]
            expected = F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), attn_mask=band)
            assert torch.allclose(out[a:b], expected.transpose(0, 1), atol=1e-10)
    with pytest.raises(TypeError, match="int32"):
        reference_flash_attn_varlen_func(q, k, v, cu.long(), cu, longest, longest)
    with pytest.raises(ValueError, match="max_seqlen"):
        reference_flash_attn_varlen_func(q, k, v, cu, cu, longest - 1, longest - 1)


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available(),
    reason="flash-attn is not installed (needs CUDA); the plumbing runs against the test reference",
)
@pytest.mark.parametrize("window", [(-1, -1), (64, 64)])
def test_real_flash_attn_varlen_matches_the_reference(window):
    from flash_attn import flash_attn_varlen_func

    q, k, v, cu, longest = _varlen_inputs(torch.bfloat16, "cuda", heads=8, heads_k=8, dim=64, lengths=(700, 1, 2000, 333))
    ours = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, window_size=window)
    reference = reference_flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, window_size=window)
    assert (ours.float() - reference.float()).abs().max().item() < 2e-2  # bf16 outputs: ~3 significant digits


def test_flash_dropout_runs_under_the_tensor_parallel_rng_tracker(monkeypatch):
    """Dropout in the flash kernel draws from the TP tracker's stream, never the default one:
    the default generator is untouched and re-seeding the tracker replays the same mask."""
    import dataclasses

    from megatron.core import tensor_parallel
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_mmbert import runtime
    from megatron_mmbert.config import PRESETS, ParallelConfig
    from megatron_mmbert.model import attention
    from megatron_mmbert.model.build import transformer_config

    monkeypatch.setattr(attention, "load_flash_varlen", lambda: reference_flash_attn_varlen_func)
    model = dataclasses.replace(PRESETS["tiny"], attention_dropout=0.5)
    runtime.initialize(model, ParallelConfig())
    try:
        config = transformer_config(model, ParallelConfig(), backend="flash")
        layer = attention.FlashVarlenAttention(config, layer_number=2)
        q, k, v, cu, longest = _varlen_inputs(torch.float32, "cpu", heads=model.num_attention_heads, dim=model.head_dim)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
        layer.eval()
        plain = layer(q, k, v, None, packed_seq_params=packed)
        layer.train()
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        default_state = torch.get_rng_state()
        first = layer(q, k, v, None, packed_seq_params=packed)
        assert torch.equal(torch.get_rng_state(), default_state)
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        again = layer(q, k, v, None, packed_seq_params=packed)
        assert torch.equal(first, again) and not torch.allclose(first, plain)
        assert first.shape == (q.shape[0], q.shape[1] * q.shape[2])
    finally:
        runtime.shutdown()


@pytest.mark.slow
def test_compiled_flex_attention_skips_blocks_correctly_and_does_not_recompile():
    """The compiled kernel (what CUDA runs) actually skips the blocks the BlockMask leaves out and
    takes full blocks without the mask (eager FlexAttention evaluates mask_mod everywhere, so only a
    compiled run tests the block structure), at 128 x 128 and at local layers' 128 x 64 blocks.
    On CPU: forward only, ~40 s of compiling. A second
    micro-batch with other documents reuses the compiled kernel (the mask is data, not code)."""
    import torch._dynamo
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    lengths = [37, 5, 1, 161, 96]  # 300 tokens: the last 128-block is padded
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, total, 16, generator=g) for _ in range(3))
    compiled = torch.compile(flex_attention, dynamic=False)
    for half_window, block in ((None, 128), (8, 128), (8, (128, 64))):  # local layers' 128 x 64 blocks too
        out = compiled(q, k, v, block_mask=document_block_mask(cu, total, half_window, block=block))
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_reference(lengths, half_window))
        assert (out - expected).abs().max().item() < 1e-5, (half_window, block)
    other = torch.tensor([0, 100, 200, 300], dtype=torch.int32)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(q, k, v, block_mask=document_block_mask(other, total, 8))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_reference([100, 100, 100], 8))
    assert (out - expected).abs().max().item() < 1e-5


def test_block_mask_is_built_without_host_reads():
    """Built once per micro-batch on the device: no ``.item()``/``bool()`` of a tensor (each a
    device synchronisation on a GPU). A host read is a call of ``aten::_local_scalar_dense``."""
    from tests.helpers.model import HostReads

    HostReads.count = 0
    cu = torch.tensor([0, 37, 42, 43, 104, 300], dtype=torch.int32)
    with HostReads():
        document_block_mask(cu, 300, 64)
        document_block_mask(cu, 300, None)
    assert HostReads.count == 0
    with HostReads():  # the detector sees host reads (positive control)
        bool(cu.sum() > 0)
    assert HostReads.count == 1


def test_sdpa_attends_pieces_that_cross_rows_as_one_segment():
    """best_fit's micro-batch packed rows (data.packed_row: micro_batch): a piece may run on from one
    row into the next. segment_masks then masks the flattened micro-batch and SDPAAttention attends over
    it as one sequence: the output equals attention run document by document on the flat tokens."""
    import torch.nn.functional as F

    from megatron_mmbert.model.attention import SDPAAttention, segment_masks

    torch.manual_seed(0)
    b, s, heads, d = 3, 16, 2, 8
    lengths = [10, 20, 5, 13]  # the 20 crosses rows 0 -> 1, the 13 rows 1 -> 2 (then 0 padding)
    cu = torch.tensor([0, 10, 30, 35, 48], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(b, s)
    for window in (1 << 20, 6):
        global_mask, local_mask = segment_masks(cu, positions, window)
        assert global_mask.shape == (1, 1, b * s, b * s)
        assert torch.equal(global_mask[0, 0], _dense_reference(lengths, None))
        assert torch.equal(local_mask[0, 0], _dense_reference(lengths, window // 2))
    # rows whose segments never cross keep the per-row [b, 1, s, s] masks
    assert segment_masks(torch.tensor([0, 7, 16, 32, 48], dtype=torch.int32), positions, 6)[0].shape == (b, 1, s, s)

    att = SDPAAttention.__new__(SDPAAttention)  # the kernel alone: no megatron config needed
    torch.nn.Module.__init__(att)
    att.dropout, att.softmax_scale = 0.0, None
    q, k, v = (torch.randn(s, b, heads, d, dtype=torch.float64) for _ in range(3))
    out = att.forward(q, k, v, segment_masks(cu, positions, 1 << 20)[0])
    assert out.shape == (s, b, heads * d)
    flat = [t.transpose(0, 1).reshape(b * s, heads, d) for t in (q, k, v)]
    got = out.transpose(0, 1).reshape(b * s, heads * d)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = F.scaled_dot_product_attention(*(x[a:e].transpose(0, 1) for x in flat))
        assert torch.allclose(got[a:e], ref.transpose(0, 1).reshape(e - a, heads * d), atol=1e-12)


def test_local_key_blocks_touch_the_window_not_three_blocks():
    """A +-64 window with 128 x 64 blocks reads 256 keys per interior query block, not 384."""
    cu = torch.tensor([0, 1024], dtype=torch.int32)
    touched = {}
    for block in (128, (128, 64)):
        mask = document_block_mask(cu, 1024, 64, block=block)
        kv_block = block if isinstance(block, int) else block[1]
        per_query_block = (mask.kv_num_blocks + mask.full_kv_num_blocks)[0, 0] * kv_block
        touched[kv_block] = int(per_query_block[1:-1].max())
    assert touched == {128: 384, 64: 256}


def test_local_layers_take_64_key_blocks_where_verified():
    """The model's local layers build 128 x 64 masks on the CPU (FlexAttention's CPU path: the
    compiled test above) and 128 x 128 on CUDA unless ``model.local_attention_block`` says 64 (the
    GPU check times both); results equal 128 x 128 and SDPA."""
    import dataclasses

    from megatron_mmbert import runtime
    from megatron_mmbert.config import PRESETS, ParallelConfig
    from megatron_mmbert.model.attention import local_kv_block
    from megatron_mmbert.model.build import build_model
    from tests.helpers.model import packed_batch

    assert local_kv_block(None, torch.device("cpu")) == 64 and local_kv_block(None, torch.device("cuda")) == 128
    assert local_kv_block(64, torch.device("cuda")) == 64 and local_kv_block(128, torch.device("cpu")) == 128
    model = dataclasses.replace(PRESETS["tiny"], num_layers=3, vocab_size=1000, local_attention=64)
    batch = packed_batch([[37, 5, 150, 64], [256]], 1000, seed=1)  # documents beside and past the blocks
    runtime.initialize(model, ParallelConfig(), seed=3)
    try:
        logits, weights = {}, None
        for backend, block in (("flex", None), ("flex", 128), ("sdpa", None)):
            (m,) = build_model(dataclasses.replace(model, attention_backend=backend, local_attention_block=block),
                               ParallelConfig(), training=False)
            weights = weights or m.state_dict()
            m.load_state_dict(weights)
            m.eval()
            if backend == "flex":
                inputs, _ = m.attention_inputs(batch["positions"], batch["cu_seqlens"], batch["max_seqlen"])
                assert inputs.global_mask.BLOCK_SIZE == (128, 128)
                assert inputs.local_mask.BLOCK_SIZE == (128, block or 64)
            with torch.no_grad():
                logits[backend, block] = m(batch["tokens"], batch["positions"], batch["cu_seqlens"],
                                           batch["max_seqlen"], return_logits=True)
    finally:
        runtime.shutdown()
    torch.testing.assert_close(logits["flex", None], logits["flex", 128], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["flex", None], logits["sdpa", None], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_block", [16, 32, 64])
def test_narrow_block_kernel_options_fit_inductors_tile_rules(kv_block, monkeypatch):
    """The CUDA kernel of 128 x ``kv_block`` masks: Triton tiles that divide the mask's blocks (what
    Inductor's FlexAttention lowering checks, torch/_inductor/kernel/flex/flex_attention.py) and obey
    the backward template's asserts, compiled apart from the 128 x 128 kernel with Inductor's
    autotuning on (without it the backward has no candidate tile dividing 64 on H100). The compile
    itself is CUDA-only: ``torch.compile`` is replaced here by a TEST DOUBLE that records its call."""
    from megatron_mmbert.model import attention

    o = {k.split("_", 1)[1]: v for k, v in attention.narrow_block_kernel_options(128, kv_block).items()}
    assert 128 % o["BLOCK_M"] == 0 and kv_block % o["BLOCK_N"] == 0
    assert kv_block % o["BLOCK_N1"] == 0 and 128 % o["BLOCK_M1"] == 0 and o["BLOCK_N1"] % o["BLOCK_M1"] == 0
    assert kv_block % o["BLOCK_N2"] == 0 and 128 % o["BLOCK_M2"] == 0 and o["BLOCK_M2"] % o["BLOCK_N2"] == 0
    with pytest.raises(ValueError, match="narrow FlexAttention blocks"):
        attention.narrow_block_kernel_options(64, 64)

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((fn, kw)) or fn)
    monkeypatch.setattr(attention, "_COMPILED_FLEX", None)
    monkeypatch.setattr(attention, "_COMPILED_FLEX_NARROW", None)
    narrow = attention.flex_kernel(torch.device("cuda"), (128, kv_block))
    square = attention.flex_kernel(torch.device("cuda"), (128, 128))
    assert narrow.keywords == {"kernel_options": attention.narrow_block_kernel_options(128, kv_block)}
    assert calls[0] == (attention._narrow_block_flex, {"dynamic": False, "options": {"max_autotune": True}})
    assert calls[1][1] == {"dynamic": False} and square.compiled is calls[1][0]
