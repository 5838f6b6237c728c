"""Time and peak memory of a TIES merge of four mmbert-small-sized checkpoints (base + 3 models).

Both sides run as subprocesses on the same random HF-layout checkpoints (fp32, mmBERT-small
shapes from the reference spec 2.1: h=384, I=1152, V=256000, 22 layers): ours
(``tools/ties_merge.py``, per-tensor trim, density 0.2) and, if ``--mergekit-python`` points at a
Python with mergekit installed, mergekit 0.1.5's ``mergekit-yaml`` with the same TIES settings
(per-tensor magnitude trim, density 0.2, unit weights, normalize, float32). Peak memory is the
child's RSS high-water mark, read with ``getrusage(RUSAGE_CHILDREN)`` by a wrapper process per side.

    python benchmarks/merge_throughput.py --workdir /tmp/mergebench [--mergekit-python VENV/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, I, V, L = 384, 1152, 256000, 22


def shapes():
    s = {"model.embeddings.tok_embeddings.weight": (V, H), "model.embeddings.norm.weight": (H,)}
    for i in range(L):
        if i > 0:
            s[f"model.layers.{i}.attn_norm.weight"] = (H,)
        s[f"model.layers.{i}.attn.Wqkv.weight"] = (3 * H, H)
        s[f"model.layers.{i}.attn.Wo.weight"] = (H, H)
        s[f"model.layers.{i}.mlp_norm.weight"] = (H,)
        s[f"model.layers.{i}.mlp.Wi.weight"] = (2 * I, H)
        s[f"model.layers.{i}.mlp.Wo.weight"] = (H, I)
    s.update({"model.final_norm.weight": (H,), "head.dense.weight": (H, H), "head.norm.weight": (H,),
              "decoder.bias": (V,)})
    return s


def make_checkpoints(workdir: str) -> list:
    import torch
    from safetensors.torch import save_file
    from transformers import ModernBertConfig

    cfg = ModernBertConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                           num_attention_heads=6, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                           cls_token_id=2, sep_token_id=1, mask_token_id=4,
                           architectures=["ModernBertForMaskedLM"])
    paths = []
    for j, name in enumerate(["base", "m0", "m1", "m2"]):
        path = os.path.join(workdir, name)
        paths.append(path)
        os.makedirs(path, exist_ok=True)
        cfg.to_json_file(os.path.join(path, "config.json"))
        if os.path.exists(os.path.join(path, "model.safetensors")):
            continue
        os.makedirs(path, exist_ok=True)
        g_base = torch.Generator().manual_seed(0)
        g = torch.Generator().manual_seed(100 + j)
        sd = {}
        for k, s in shapes().items():
            t = 0.02 * torch.randn(s, generator=g_base)
            if j:
                t += 0.002 * torch.randn(s, generator=g)
            sd[k] = t
        save_file(sd, os.path.join(path, "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, "model.safetensors.tmp"), os.path.join(path, "model.safetensors"))
        del sd
    return paths


def measure(cmd, env=None):
    """Run ``cmd`` under a wrapper process; returns (seconds, peak RSS bytes of the command)."""
    wrapper = ("import resource,subprocess,sys,time,json;t=time.time();"
               "r=subprocess.run(sys.argv[1:]);"
               "print(json.dumps({'rc':r.returncode,'s':time.time()-t,"
               "'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024}))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{out.stderr[-3000:]}")
    return res["s"], res["rss"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--mergekit-python", default=None, help="python of a venv with mergekit==0.1.5")
    p.add_argument("--density", type=float, default=0.2)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    base, *models = make_checkpoints(args.workdir)
    ckpt_bytes = os.path.getsize(os.path.join(base, "model.safetensors"))
    results = {"checkpoint_bytes": ckpt_bytes}

    ours_out = os.path.join(args.workdir, "out_ours")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "ties_merge.py"), "--base", base, "--models", *models,
           "--density", str(args.density), "--normalize", "--out", ours_out, "--overwrite", "--quiet"]
    results["ours_s"], results["ours_rss"] = measure(cmd)

    if args.mergekit_python:
        mk_out = os.path.join(args.workdir, "out_mergekit")
        yaml = os.path.join(args.workdir, "ties.yaml")
        with open(yaml, "w") as f:
            f.write(f"merge_method: ties\nbase_model: {base}\nmodels:\n")
            for m in models:
                f.write(f"  - model: {m}\n    parameters: {{weight: 1.0, density: {args.density}}}\n")
            f.write("parameters:\n  normalize: true\ndtype: float32\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        mk_bin = os.path.join(os.path.dirname(args.mergekit_python), "mergekit-yaml")
        results["mergekit_s"], results["mergekit_rss"] = measure(
            [mk_bin, yaml, mk_out, "--no-copy-tokenizer", "--allow-crimes"], env=env)
        results["agreement"] = compare(ours_out, mk_out)

    print(json.dumps(results, indent=1))
    return 0


def compare(a: str, b: str) -> dict:
    """Largest difference and share of differing entries between the two outputs."""
    import glob

    import torch
    from safetensors import safe_open

    def files(d):
        return {k: f for f in glob.glob(os.path.join(d, "*.safetensors")) for k in safe_open(f, "pt").keys()}

    fa, fb = files(a), files(b)
    worst, differ, total = 0.0, 0, 0
    for k in fa:
        if k not in fb:
            continue
        with safe_open(fa[k], "pt") as x, safe_open(fb[k], "pt") as y:
            ta, tb = x.get_tensor(k), y.get_tensor(k)
        d = (ta.float() - tb.float()).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 1e-6).sum())
        total += d.numel()
    return {"max_abs_diff": worst, "fraction_differing": differ / max(total, 1),
            "keys_only_in_ours": sorted(set(fa) - set(fb)), "keys_only_in_mergekit": sorted(set(fb) - set(fa))}


if __name__ == "__main__":
    sys.exit(main())
