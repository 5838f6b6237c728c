"""Optimizer state through a training checkpoint, in one process: megatron-core's
DistributedOptimizer on torch's AdamW (what runs without TransformerEngine/Apex) saves and loads its
moments, main params and Adam step count exactly, and the per-parameter state materialised before a
load exists only where megatron-core's own flag says the optimizer keeps a per-parameter ``step``."""


import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import ParallelConfig, model_preset
from megatron_mmbert.model.build import build_model
from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.training.config import OptimizerSection
from megatron_mmbert.training.step import build_optimizer, train_step, wrap_ddp
from tests.helpers.model import packed_batch

MODEL = model_preset("tiny", num_layers=2, attention_output_dropout=0.0)


def _rows(seed):
    rows = []
    for i in range(2):
        b = packed_batch([[20, 44]] if i % 2 else [[64]], MODEL.vocab_size, seed=seed + i)
        labels = torch.full_like(b["tokens"], -100)
        labels[:, ::5] = b["tokens"][:, ::5]
        b["labels"] = labels
        rows.append(b)
    return rows


@pytest.fixture
def build():
    """(chunks, optimizer) factory at one process; tears the runtime down afterwards."""
    def make(distributed: bool, precision: str = "fp32", name: str = "adamw"):
        parallel = ParallelConfig(use_distributed_optimizer=distributed)
        if not torch.distributed.is_initialized():
            runtime.initialize(MODEL, parallel, seed=3)
        chunks = wrap_ddp(build_model(MODEL, parallel, precision), parallel, precision)
        section = OptimizerSection(name=name, clip_grad=1.0 if name == "adamw" else 0.0)
        return chunks, build_optimizer(chunks, section, parallel, lr=1e-3, weight_decay=0.1, precision=precision)

    yield make
    runtime.shutdown()


def _torch_states(optimizer):
    return [s for opt in ckpt._inner_optimizers(optimizer) for s in opt.optimizer.state.values()]


def test_materialise_only_where_megatron_uses_torch_adam(build):
    from megatron.core.optimizer import distrib_optimizer

    chunks, dist = build(distributed=True)
    inner = ckpt._inner_optimizers(dist)
    assert all(isinstance(o, distrib_optimizer.DistributedOptimizer) for o in inner)
    # megatron-core's flag: False here (no TE/Apex), True on a GPU image with TE's FusedAdam.
    assert ckpt.uses_per_parameter_step(inner[0]) == (not distrib_optimizer.HAVE_APEX_OR_TE)
    assert ckpt.uses_per_parameter_step(inner[0], have_apex_or_te=False)
    assert not ckpt.uses_per_parameter_step(inner[0], have_apex_or_te=True)
    ckpt.materialize_optimizer_state(dist, have_apex_or_te=True)  # FusedAdam: nothing added
    assert _torch_states(dist) == []
    ckpt.materialize_optimizer_state(dist, have_apex_or_te=False)
    states = _torch_states(dist)
    assert states and all(set(s) == {"step", "exp_avg", "exp_avg_sq"} and s["step"] == 0 for s in states)
    # The non-distributed optimizer allocates its own state (megatron's init_state_fn): untouched.
    _, plain = build(distributed=False)
    assert not any(ckpt.uses_per_parameter_step(o, have_apex_or_te=False) for o in ckpt._inner_optimizers(plain))
    ckpt.materialize_optimizer_state(plain, have_apex_or_te=False)
    assert _torch_states(plain) == []


@pytest.mark.parametrize("name", ["adamw", "stable_adamw"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distributed_optimizer_state_round_trip(build, tmp_path, precision, name):
    """StableAdamW keeps torch Adam's state keys, so the same save/load path serves it."""
    chunks, opt = build(distributed=True, precision=precision, name=name)
    for step in range(3):
        assert train_step(chunks, opt, _rows(10 * step)).update_ok
    before = [{k: v.clone() for k, v in s.items()} for s in _torch_states(opt)]
    assert {float(s["step"]) for s in before} == {3.0}
    ckpt.save_training(str(tmp_path), "iter_0000003", chunks, opt, MODEL, {"step": 3})

    fresh_chunks, fresh = build(distributed=True, precision=precision, name=name)
    meta = ckpt.load_training(str(tmp_path / "iter_0000003"), fresh_chunks, fresh)
    assert meta["loaded_optimizer"]
    after = _torch_states(fresh)
    assert len(after) == len(before)
    for b, a in zip(before, after):
        assert set(a) == set(b)
        for k in b:
            assert torch.equal(a[k], b[k]), k
    # Every parameter owns its step: torch's Adam increments each one once per step.
    assert len({id(s["step"]) for s in after}) == len(after)
    # The next step is the same on both.
    r1, r2 = train_step(chunks, opt, _rows(99)), train_step(fresh_chunks, fresh, _rows(99))
    assert r1.loss == r2.loss
    for p, q in zip(chunks[0].parameters(), fresh_chunks[0].parameters()):
        assert torch.equal(p, q)
