"""Every parallel layout computes the same step as one process (megatron-core's real code paths).

The same weights and global batch at TP1/PP1 (one process) and, in one 4-process torchrun world,
TP2xDP2, TP2 with sequence parallelism xDP2, PP2xDP2 with the distributed optimizer, TP2xPP2, PP2 with 2 virtual stages xDP2, and DP4
with the distributed optimizer (also with overlapped grad reduce-scatter and param all-gather), and TP2xPP2
with full activation recompute: same loss (1e-5) and, after one AdamW step, the same weights.
StableAdamW: three steps at TP2xDP2 with the distributed optimizer (tensors split over TP and DP
ranks, whole-tensor clipping statistics) equal three steps of one process.
bf16 (bf16 weights, fp32 main params): the first step tracks fp32's, and TP2xPP2 and PP2xDP2 with the
distributed optimizer take one bf16 process's step (to bf16 rounding).
"""

import dataclasses
import json

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import ParallelConfig
from megatron_mmbert.convert.checkpoints import import_hf, load_canonical
from megatron_mmbert.model.build import build_model
from megatron_mmbert.model.pipeline import _unwrap
from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.training.config import OptimizerSection
from megatron_mmbert.training.step import build_optimizer, train_step, wrap_ddp
from tests.helpers.model import make_hf_model, packed_batch, torchrun

LAYOUTS = ["tp2_dp2", "tp2_sp_dp2", "pp2_dp2_distopt", "tp2_pp2", "pp2_vpp2_dp2", "dp4_distopt", "dp4_distopt_overlap",
           "tp2_pp2_full_recompute"]
SETTINGS = dict(lr=1e-3, weight_decay=0.1)  # as in the worker (clip_grad 1.0: OptimizerSection's default)


def _global_batch(vocab):
    rows = []
    for i in range(4):
        b = packed_batch([[20, 44]] if i % 2 else [[64]], vocab, seed=10 + i)
        g = torch.Generator().manual_seed(i)
        labels = torch.full_like(b["tokens"], -100)
        selected = torch.rand(b["tokens"].shape, generator=g) < 0.1 * (i + 1)  # unequal counts
        labels[selected] = b["tokens"][selected]
        b["labels"] = labels
        rows.append(b)
    return rows


def single_process_step(model, init_dir, rows, precision="fp32", steps=1):
    """One optimizer step on one process: (stats, weights before, weights after), the reference
    (``steps`` > 1: the stats of the last step, on the same batch)."""
    parallel = ParallelConfig()
    runtime.initialize(model, parallel, seed=7)
    try:
        chunks = build_model(model, parallel, precision)
        ckpt.load_model(init_dir, chunks)
        initial = {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}
        chunks = wrap_ddp(chunks, parallel, precision)
        optimizer = build_optimizer(chunks, OptimizerSection(clip_grad=1.0), parallel, **SETTINGS, precision=precision)
        for _ in range(steps):
            stats = dataclasses.asdict(train_step(chunks, optimizer, rows))
        inner = _unwrap(chunks[0])
        after = {k: v.clone() for k, v in inner.state_dict().items() if torch.is_tensor(v)}
    finally:
        runtime.shutdown()
    return stats, initial, after


@pytest.mark.slow
def test_layouts_match_single_process(tmp_path):
    make_hf_model("even", str(tmp_path / "hf"))
    model = import_hf(str(tmp_path / "hf"), str(tmp_path / "init"))
    runtime.shutdown()
    rows = _global_batch(model.vocab_size)
    torch.save(rows, tmp_path / "rows.pt")

    reference, initial, after = single_process_step(model, str(tmp_path / "init"), rows)
    assert reference["update_ok"] and reference["tokens"] == sum(int((r["labels"] != -100).sum()) for r in rows)
    moved = max((after[k] - initial[k]).abs().max().item() for k in after)
    assert moved > 1e-4  # the step did change the weights, so equal weights below mean something

    torchrun("equivalence_worker.py", 4, str(tmp_path / "init"), str(tmp_path / "rows.pt"), str(tmp_path / "out"))
    for layout in LAYOUTS:
        stats = json.loads((tmp_path / "out" / f"{layout}.json").read_text())
        assert abs(stats["loss"] - reference["loss"]) < 1e-5, layout
        assert stats["tokens"] == reference["tokens"], layout
        assert abs(stats["grad_norm"] - reference["grad_norm"]) < 1e-5, layout
        _, weights = load_canonical(str(tmp_path / "out" / layout))
        runtime.shutdown()
        assert weights.keys() == after.keys(), layout
        # Adam's first step is lr * g / (|g| + eps): on entries whose true gradient is ~0, summation
        # order noise (~1e-11) moves the update by up to ~lr * 1e-3. Allow 1% of one step (lr 1e-3).
        worst = max((weights[k] - after[k]).abs().max().item() for k in after)
        assert worst < 1e-5, f"{layout}: weights differ by {worst}"


@pytest.mark.slow
def test_stable_adamw_tp2_dp2_distributed_optimizer_matches_single_process(tmp_path):
    make_hf_model("even", str(tmp_path / "hf"))  # vocab 333: padded to 384 at TP1, 512 at TP2
    model = import_hf(str(tmp_path / "hf"), str(tmp_path / "init"))
    runtime.shutdown()
    steps = [_global_batch(model.vocab_size)]
    for k in (1, 2):  # later steps on other rows, one with a tenth of the labels: larger updates
        rows = [dict(r, tokens=torch.roll(r["tokens"], 7 * k, dims=1)) for r in steps[0]]
        if k == 2:
            for r in rows:
                r["labels"] = torch.where(torch.rand(r["labels"].shape, generator=torch.Generator().manual_seed(5)) < 0.1,
                                          r["labels"], torch.full_like(r["labels"], -100))
        steps.append(rows)
    torch.save({"steps": steps}, tmp_path / "steps.pt")
    section = OptimizerSection(name="stable_adamw", clip_grad=0.0)  # as the worker

    parallel = ParallelConfig()
    runtime.initialize(model, parallel, seed=7)
    chunks = build_model(model, parallel)
    ckpt.load_model(str(tmp_path / "init"), chunks)
    chunks = wrap_ddp(chunks, parallel)
    optimizer = build_optimizer(chunks, section, parallel, lr=1e-3, weight_decay=0.1)
    clipped = 0
    for rows in steps:
        reference = dataclasses.asdict(train_step(chunks, optimizer, rows))
        clipped += sum(o.optimizer.last_clipped for o in getattr(optimizer, "chained_optimizers", [optimizer]))
    after = {k: v.clone() for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}
    runtime.shutdown()
    assert clipped > 0  # some tensor's update was clipped: the whole-tensor statistic mattered

    torchrun("equivalence_worker.py", 4, str(tmp_path / "init"), str(tmp_path / "steps.pt"), str(tmp_path / "out"),
             "stable_adamw", "tp2_dp2_distopt")
    stats = json.loads((tmp_path / "out" / "tp2_dp2_distopt.json").read_text())
    assert abs(stats["loss"] - reference["loss"]) < 1e-5
    assert abs(stats["grad_norm"] - reference["grad_norm"]) < 1e-5
    _, weights = load_canonical(str(tmp_path / "out" / "tp2_dp2_distopt"))
    runtime.shutdown()
    # As above, summation-order noise on entries with ~0 gradient moves single updates: allow 1% of
    # a step per step (3e-5) on the worst entry. A clipping factor computed on part of a tensor would
    # move every entry of it, so the mean difference per tensor must stay at rounding level.
    worst = max((weights[k] - after[k]).abs().max().item() for k in after)
    assert worst < 3e-5, f"weights differ by {worst}"
    mean = max((weights[k] - after[k]).abs().mean().item() for k in after)
    assert mean < 1e-7, f"weights differ by {mean} on average in some tensor"


# -- bf16: megatron-core's mixed precision (bf16 weights and activations, fp32 main params, fp32
# gradient reduction), what ``precision: bf16`` trains ------------------------------------------


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    make_hf_model("even", str(root / "hf"))
    model = import_hf(str(root / "hf"), str(root / "init"))
    runtime.shutdown()
    return model, str(root / "init")


def test_bf16_first_step_tracks_fp32(initial_checkpoint):
    """The first step of a bf16 run computes fp32's loss and gradient norm to bf16 precision.

    bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per operation) but the loss is a
    mean over ~60 labelled tokens (cross-entropy in fp32), so rounding errors average out: measured
    1e-5 relative here (grad norm 0.1%). The tolerance, 0.1% (0.5% for the grad norm), is one bf16
    rounding step and still far under the 3.5% one step moves the loss (checked below)."""
    model, init = initial_checkpoint
    rows = _global_batch(model.vocab_size)
    fp32, _, fp32_after = single_process_step(model, init, rows, "fp32")
    bf16, initial, bf16_after = single_process_step(model, init, rows, "bf16")
    assert all(v.dtype == torch.bfloat16 for k, v in initial.items() if "rotary" not in k)
    assert fp32["tokens"] == bf16["tokens"] and bf16["update_ok"]
    assert abs(bf16["loss"] - fp32["loss"]) < 1e-3 * fp32["loss"], (bf16["loss"], fp32["loss"])
    assert abs(bf16["grad_norm"] - fp32["grad_norm"]) < 5e-3 * fp32["grad_norm"], (bf16["grad_norm"], fp32["grad_norm"])
    # The updated bf16 weights are the fp32 run's, rounded (2^-8 relative, twice, of the larger of
    # the two values: a flipped entry is rounded at its bf16 magnitude), except where Adam's first step
    # (lr * g / |g|, lr 1e-3) flips sign on a near-zero gradient: 2 * lr.
    for key, weight in fp32_after.items():
        other = bf16_after[key].float()
        diff = (other - weight).abs()
        assert (diff <= 2 ** -7 * torch.maximum(weight.abs(), other.abs()) + 2e-3).all(), key
    # Negative control: one step changes the loss by more than the tolerance allows.
    second, _, _ = single_process_step(model, init, rows, "fp32", steps=2)
    assert abs(second["loss"] - fp32["loss"]) > 1e-2 * fp32["loss"], (second["loss"], fp32["loss"])


@pytest.mark.slow
def test_bf16_layouts_match_single_process(initial_checkpoint, tmp_path):
    """TP2xPP2 and PP2xDP2 with the distributed optimizer, in bf16, take one process's bf16 step.

    Layouts change where bf16 activations are summed (TP splits the matmuls' reduction dimension and
    all-reduces partial sums in bf16), so results agree to bf16 rounding, not bitwise. Measured:
    loss within 6e-6 relative, grad norm 9e-5, and the bf16 weights after the step apart by 0.5%
    (TP2xPP2) / 0.003% (PP2xDP2) of what the step moved them (sum of |diff|). Tolerances: 0.1% for
    loss and grad norm (a quarter of one bf16 rounding step, 2^-8), 5% of the step for the weights
    (an entry whose bf16 rounding flips moves by one ulp, ~ the step itself at |w| ~ 0.25)."""
    model, init = initial_checkpoint
    rows = _global_batch(model.vocab_size)
    torch.save(rows, tmp_path / "rows.pt")
    reference, initial, after = single_process_step(model, init, rows, "bf16")
    step = sum((after[k].float() - initial[k].float()).abs().sum().item() for k in after)
    torchrun("equivalence_worker.py", 4, init, str(tmp_path / "rows.pt"), str(tmp_path / "out"),
             env={"LAYOUTS": "tp2_pp2,pp2_dp2_distopt", "PRECISION": "bf16"})
    for layout in ("tp2_pp2", "pp2_dp2_distopt"):
        stats = json.loads((tmp_path / "out" / f"{layout}.json").read_text())
        assert stats["tokens"] == reference["tokens"], layout
        assert abs(stats["loss"] - reference["loss"]) < 1e-3 * reference["loss"], (layout, stats["loss"], reference["loss"])
        assert abs(stats["grad_norm"] - reference["grad_norm"]) < 1e-3 * reference["grad_norm"], layout
        _, weights = load_canonical(str(tmp_path / "out" / layout))
        runtime.shutdown()
        assert weights.keys() == after.keys(), layout
        apart = sum((weights[k].float() - after[k].float()).abs().sum().item() for k in after)
        assert apart < 0.05 * step, f"{layout}: weights {apart:.3g} apart, the step moved them {step:.3g}"
