"""The chunked decoder + vocab-parallel cross-entropy (``model/mlm_loss.py``) computes what the
encoder computed before it -- megatron-core's ``vocab_parallel_cross_entropy`` over the whole
``[labelled x vocab]`` logits -- within 1e-6 in fp32 and bf16 rounding under autocast, at TP 1 and
TP 2; and the encoder's head never holds more than one chunk of logits."""

import pytest
import torch

from megatron_mmbert.model.mlm_loss import VocabShard, chunked_cross_entropy, default_chunk_rows
from tests.helpers.mlm_loss_reference import head_inputs, reference_loss
from tests.helpers.model import torchrun, world_of_one


@pytest.fixture(scope="module")
def tp1():
    """megatron's TP state for one process (what ``vocab_parallel_cross_entropy`` reads)."""
    with world_of_one():
        yield


def _run(fn, h, w, b, target, valid, reduction, weights, chunk_rows=None, dtype=None):
    hh, ww, bb = (t.clone().requires_grad_(True) for t in (h, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        if fn == "ours":
            loss, correct = chunked_cross_entropy(hh, ww, bb, target, VocabShard(0, valid), chunk_rows,
                                                  reduction=reduction, count_correct=True)
        else:
            losses, arg = reference_loss(hh, ww, bb, target, 0, valid)
            loss, correct = (losses.sum() if reduction == "sum" else losses), (arg == target).sum()
    (loss * weights).sum().backward()
    return loss.detach(), int(correct), hh.grad, ww.grad, bb.grad


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_fp32_equals_megatron_cross_entropy(tp1, reduction, chunk_rows):
    h, w, b, target = head_inputs(45, 32, 96, seed=1, vocab=90)  # 6 padded columns
    weights = torch.linspace(0.5, 1.5, 45) if reduction == "none" else torch.tensor(0.7)
    ours = _run("ours", h, w, b, target, 90, reduction, weights, chunk_rows)
    ref = _run("reference", h, w, b, target, 90, reduction, weights)
    assert ours[1] == ref[1] > 0
    for a, r in zip(ours[:1] + ours[2:], ref[:1] + ref[2:]):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    assert ours[4][90:].abs().max() == 0 and ours[3][90:].abs().max() == 0  # padding: no gradient


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_autocast_bf16_within_bf16_rounding(tp1, reduction):
    h, w, b, target = head_inputs(40, 64, 200, seed=2)
    weights = torch.linspace(0.5, 1.5, 40) if reduction == "none" else torch.tensor(1.0)
    ours = _run("ours", h, w, b, target, 200, reduction, weights, 16, torch.bfloat16)
    ref = _run("reference", h, w, b, target, 200, reduction, weights, dtype=torch.bfloat16)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)  # same bf16 GEMM, fp32 softmax
    assert abs(ours[1] - ref[1]) <= 1
    for a, r in zip(ours[2:], ref[2:]):  # bf16 GEMMs of the gradient: bf16 rounding apart
        assert a.dtype == r.dtype == torch.float32
        assert (a - r).abs().max() <= 2e-2 * r.abs().max()


def test_no_labelled_tokens(tp1):
    h, w, b, target = head_inputs(0, 8, 16, seed=3)
    ww = w.clone().requires_grad_(True)
    loss, correct = chunked_cross_entropy(h, ww, b, target, VocabShard(0, 16), reduction="sum", count_correct=True)
    loss.backward()
    assert loss.item() == 0 and correct.item() == 0 and ww.grad.abs().sum() == 0


def test_chunk_rows_default_bounds_the_chunk():
    assert default_chunk_rows(256000) * 256000 <= 1 << 25 and default_chunk_rows(128000) == 2 * default_chunk_rows(256000)
    assert default_chunk_rows(10) == (1 << 25) // 10 and default_chunk_rows(1 << 30) == 16


@pytest.mark.slow
def test_tensor_parallel_2_equals_megatron_cross_entropy(tmp_path):
    out = str(tmp_path / "out.pt")
    torchrun("mlm_loss_worker.py", 2, out)
    for rank in (0, 1):
        results = torch.load(out + f".rank{rank}")
        for (dtype, reduction), (ours, ref) in results.items():
            assert int(ours[1]) == int(ref[1]) > 0
            tol = 1e-6 if dtype == "None" else 1e-5
            torch.testing.assert_close(ours[0], ref[0], rtol=tol, atol=tol)
            for a, r in zip(ours[2:], ref[2:]):
                if dtype == "None":
                    torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
                else:
                    assert (a - r).abs().max() <= 2e-2 * r.abs().max()
