"""StableAdamW inside megatron-core's optimizer wrappers against torch-optimi's ``StableAdamW``.

The same gradients (random, with a 10x spike so update clipping engages) go to our optimizer on a
megatron model -- plain fp32 optimizer and the distributed optimizer, vocabulary padded 1000 -> 1024 --
and to optimi on unpadded copies of the parameters: after every step the weights agree to 1e-6
relative. The layout equivalence (TP2 x DP2, distributed optimizer) is in test_parallel_equivalence.py.
"""

import copy
import dataclasses

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import PRESETS, ParallelConfig
from megatron_mmbert.model.build import build_model
from megatron_mmbert.training.stable_adamw import StableAdamW, debias_beta
from megatron_mmbert.training.config import OptimizerSection
from megatron_mmbert.training.step import build_optimizer, wrap_ddp

optimi = pytest.importorskip("optimi")

LR, BETAS, EPS = 1e-2, (0.9, 0.95), 1e-8
FULLY_DECOUPLED_WD = 1e-3  # optimi's decouple_lr convention; megatron's AdamW-style wd = this / LR
SCALES = [1.0, 1.0, 10.0, 0.1, 3.0]


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    runtime.shutdown()


def test_debias_beta_is_adams_bias_correction():
    # an EMA with beta_hat_t equals Adam's bias-corrected average (1 - beta) sum beta^(t-i) x_i / (1 - beta^t)
    xs = torch.randn(6, dtype=torch.float64)
    ema = torch.tensor(0.0, dtype=torch.float64)
    for t, x in enumerate(xs, 1):
        b = debias_beta(0.95, t)
        ema = b * ema + (1 - b) * x
        adam = sum((1 - 0.95) * 0.95 ** (t - i) * xs[i - 1] for i in range(1, t + 1)) / (1 - 0.95**t)
        assert float(ema) == pytest.approx(float(adam), rel=1e-12)


def test_plain_torch_optimizer_matches_optimi():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ours = [torch.randn(s) for s in shapes]
    ref = [p.clone() for p in ours]
    a = StableAdamW([{"params": ours[:2], "weight_decay": FULLY_DECOUPLED_WD / LR}, {"params": ours[2:], "weight_decay": 0.0}],
                    lr=LR, betas=BETAS, eps=EPS)
    b = optimi.StableAdamW([{"params": ref[:2], "weight_decay": FULLY_DECOUPLED_WD}, {"params": ref[2:], "weight_decay": 0.0}],
                           lr=LR, betas=BETAS, eps=EPS, decouple_lr=True, max_lr=LR, foreach=False, triton=False,
                           kahan_sum=False)
    for scale in SCALES:
        for p, q in zip(ours, ref):
            g = scale * torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(ours, ref):
            assert (p - q).abs().max() <= 1e-6 * q.abs().max()
    assert {k for s in a.state.values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}  # torch Adam's keys


def _unpadded(name, tensor, vocab):
    vocab_parallel = name.endswith("word_embeddings.weight") or name.endswith("output_layer.bias")
    return tensor[:vocab] if vocab_parallel else tensor


@pytest.mark.parametrize("distributed,precision", [(False, "fp32"), (True, "fp32"), (True, "bf16")],
                         ids=["fp32_optimizer", "distributed_optimizer", "distributed_optimizer_bf16"])
def test_megatron_stable_adamw_matches_optimi(distributed, precision):
    """bf16 (the shipped configs' choice): the fp32 master weights follow optimi's fp32 weights."""
    model = dataclasses.replace(PRESETS["tiny"], num_layers=2, vocab_size=1000)  # padded to 1024
    parallel = ParallelConfig(use_distributed_optimizer=distributed)
    runtime.initialize(model, parallel, seed=3)
    chunks = wrap_ddp(build_model(model, parallel, precision), parallel, precision)
    section = OptimizerSection(name="stable_adamw", adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS,
                               clip_grad=0.0)
    weight_decay = FULLY_DECOUPLED_WD / LR
    optimizer = build_optimizer(chunks, section, parallel, lr=LR, weight_decay=weight_decay, precision=precision)
    for group in optimizer.param_groups:  # what the LR scheduler sets each step
        group["weight_decay"] = weight_decay * group["wd_mult"]
    named = list(chunks[0].module.named_parameters())
    if precision == "bf16":
        named = [(n.replace("module.", "", 1), p) for n, p in named]
    assert any(p.numel() != getattr(p, "unpadded_numel", p.numel()) for _, p in named)  # padding present

    def master(p):  # the weights the optimizer updates: fp32 copies under bf16
        return p.main_param.view(p.shape) if precision == "bf16" else p

    ref = {n: _unpadded(n, master(p), model.vocab_size).detach().float().clone() for n, p in named}
    no_decay = {n for n, p in named if p.dim() == 1 or n.endswith(".bias")}  # megatron's wd_mult 0 rule
    reference = optimi.StableAdamW(
        [{"params": [ref[n] for n, _ in named if n not in no_decay], "weight_decay": FULLY_DECOUPLED_WD},
         {"params": [ref[n] for n, _ in named if n in no_decay], "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS, decouple_lr=True, max_lr=LR, foreach=False, triton=False, kahan_sum=False,
    )
    torch.manual_seed(1)
    clipped = 0
    for scale in SCALES:
        for n, p in named:
            g = scale * torch.randn(p.shape)
            if n.endswith("word_embeddings.weight") or n.endswith("output_layer.bias"):
                g[model.vocab_size:] = 0  # padded rows never get a gradient
            p.main_grad.copy_(g)
            ref[n].grad = _unpadded(n, g, model.vocab_size).clone()
        ok, _, _ = optimizer.step()
        reference.step()
        assert ok
        for n, p in named:
            mine = _unpadded(n, master(p).detach(), model.vocab_size)
            assert (mine - ref[n]).abs().max() <= 1e-6 * ref[n].abs().max(), n
        clipped += sum(o.optimizer.last_clipped for o in getattr(optimizer, "chained_optimizers", [optimizer]))
    assert clipped > 0  # the spike step did clip updates, so the agreement covers that path


@pytest.mark.parametrize("where", ["per_parameter", "group_only"])
def test_step_count_survives_a_state_dict_round_trip(where):
    """Megatron keeps the step per parameter (torch Adam) or, with TE/Apex FusedAdam, only in the
    param groups; either way the bias correction continues at the right step after a reload."""
    torch.manual_seed(0)
    grads = [torch.randn(4, 3) * s for s in SCALES]
    p = torch.randn(4, 3)
    q = p.clone()
    a = StableAdamW([p], lr=LR, betas=BETAS, eps=EPS)
    for g in grads[:3]:
        p.grad = g.clone()
        a.step()
    state = copy.deepcopy(a.state_dict())  # state_dict() shares the live tensors
    if where == "group_only":
        for s in state["state"].values():
            s["step"] = torch.tensor(0.0)  # a placeholder, as a materialised-but-not-loaded state says
    b = StableAdamW([q], lr=LR, betas=BETAS, eps=EPS)
    with torch.no_grad():
        q.copy_(p)
    b.load_state_dict(state)
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p, q)
