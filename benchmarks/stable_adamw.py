"""StableAdamW's step on mmBERT-small's parameters: the per-tensor loop it was vs foreach kernels (issue 25).

Before (written out below as it was in ``training/stable_adamw.py``): per parameter ~10 kernels in a
Python loop, a ``torch.tensor(float(p.numel()), device=...)`` host-to-device copy, a ``.item()`` of
the step count. Now: ``torch._foreach_*`` over each group, element counts built once. Both run on
the same parameters and gradients (mmBERT-small's tensors: 256k x 384 tied embedding, 22 layers,
head; two groups, decay and no decay, as megatron makes them); the results must be equal.

  python benchmarks/stable_adamw.py [--device cpu] [--rounds 5] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import machine, report  # noqa: E402
from megatron_mmbert.training.stable_adamw import StableAdamW, debias_beta  # noqa: E402


class LoopStableAdamW(StableAdamW):
    """The step as it was before issue 25 (the baseline), unchanged."""

    @torch.no_grad()
    def step(self, closure=None):
        entries, partial = [], []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps_sq = group["eps"] ** 2
            group_step = group.get("step", 0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in state or state["step"].item() < group_step:
                    state["step"] = torch.tensor(float(group_step), dtype=torch.float32)
                state["step"] = state["step"] + 1
                t = int(state["step"].item())
                group["step"] = t
                b1, b2 = debias_beta(beta1, t), debias_beta(beta2, t)
                state["exp_avg"].lerp_(grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                ratio = grad.pow(2).div_(state["exp_avg_sq"].clamp(min=eps_sq))
                partial.append(torch.stack([ratio.sum(dtype=torch.float64),
                                            torch.tensor(float(p.numel()), dtype=torch.float64, device=p.device)]))
                entries.append((group, p, state))
        stats = torch.stack(partial)
        rms = (stats[:, 0] / stats[:, 1].clamp(min=1.0)).sqrt().tolist()
        self.last_clipped = sum(r > 1.0 for r in rms)
        for (group, p, state), r in zip(entries, rms):
            lr = group["lr"] / max(1.0, r)
            if group["weight_decay"] != 0:
                p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-lr)


def small_shapes(layers: int = 22, hidden: int = 384, ffn: int = 1152, vocab: int = 256000):
    """(decay, no-decay) parameter shapes of mmBERT-small (megatron's layout: fused QKV, GLU fc1)."""
    decay = [(vocab, hidden)]
    no_decay = [(hidden,), (vocab,)]  # embedding norm, decoder bias
    for _ in range(layers):
        decay += [(3 * hidden, hidden), (hidden, hidden), (2 * ffn, hidden), (hidden, ffn)]
        no_decay += [(hidden,), (hidden,)]
    decay += [(hidden, hidden)]  # head dense
    no_decay += [(hidden,), (hidden,)]  # final norm, head norm
    return decay, no_decay


def make(cls, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    decay, no_decay = small_shapes()
    groups = []
    for shapes, wd in ((decay, 0.1), (no_decay, 0.0)):
        params = [torch.randn(s, generator=g).to(device) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        groups.append({"params": params, "weight_decay": wd})
    return cls(groups, lr=1e-3)


def timed_step(opt, device):
    """(wall, CPU) seconds of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: a shared machine's load does not stall OpenMP barriers)")
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    old, new = make(LoopStableAdamW, device), make(StableAdamW, device)
    n_tensors = sum(len(g["params"]) for g in new.param_groups)
    n_params = sum(p.numel() for g in new.param_groups for p in g["params"])
    old.step(), new.step()  # first steps create the state
    best, cpu = [float("inf"), float("inf")], [float("inf"), float("inf")]
    for _ in range(args.rounds):  # interleaved: load on a shared machine hits both alike
        for i, opt in enumerate((old, new)):
            wall, used = timed_step(opt, device)
            best[i], cpu[i] = min(best[i], wall), min(cpu[i], used)
    diff = max(float((a - b).abs().max()) for ga, gb in zip(old.param_groups, new.param_groups)
               for a, b in zip(ga["params"], gb["params"]))
    lines = [
        f"\n## StableAdamW step, per-tensor loop vs foreach (issue 25) ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {machine(args.device)}; torch {torch.__version__}; fp32; 1 process, {args.threads} thread(s)",
        f"- command: `python benchmarks/stable_adamw.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- mmBERT-small's parameters: {n_tensors} tensors, {n_params / 1e6:.1f} M elements, two groups; "
        f"best of {args.rounds} steady steps, interleaved",
        "",
        "| | per-tensor loop (before, the anchor) | foreach (now) | speed-up |",
        "|---|---|---|---|",
        f"| optimizer step, wall | {best[0] * 1e3:.0f} ms | {best[1] * 1e3:.0f} ms | **{best[0] / best[1]:.2f}x** |",
        f"| optimizer step, CPU time | {cpu[0] * 1e3:.0f} ms | {cpu[1] * 1e3:.0f} ms | {cpu[0] / cpu[1]:.2f}x |",
        "",
        f"Largest weight difference after {args.rounds + 1} steps: {diff:.1e}. Goal >= 1.5x faster: "
        f"**{'met' if best[0] / best[1] >= 1.5 else 'NOT met'}**.",
    ]
    report(lines, args.append)


if __name__ == "__main__":
    main()
