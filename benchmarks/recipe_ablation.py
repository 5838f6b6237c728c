"""mmBERT's three recipe claims in miniature, on CPU, from one shared pre-training (arXiv:2509.06888).

(a) Annealed language learning: a decay over *all* languages at tau 0.3 against a decay over the
    mid-training languages only, scored on the held-out documents of the languages the decay adds.
(b) Inverse masking: 30% -> 15% -> 5% over pretrain / mid / decay against a constant 15% (a second,
    separate run with the same token budgets).
(c) TIES merge of the three decay variants (English-heavy-like: the largest language pinned at 40%;
    mid-training languages; all languages) against each variant, macro over languages.

Steps, all through the repository's own tools (each resumes when the work folder is reused):
demo corpus (gettext catalogs, 20 languages) -> tokenizer -> ``tools/preprocess_data.py
--holdout-docs`` -> ``pretrain_mmbert.py`` (torchrun) for the shared 3-phase run ("inverse": its
decay is the all-languages variant) and for the constant-15% run -> two decay branches from the
shared ``phase_end_mid`` (``--init.start_phase decay``) -> ``tools/ties_merge.py`` ->
``tools/evaluate.py --compare`` of all of them on the held-out manifest (the same masked rows for
every model; mask rate 15%).

``--scale`` multiplies the phase token budgets (1.0: 300 / 100 / 100 steps of 16 rows); ``--model tiny``
is the quickstart's 0.6M model, ``small`` (default) a ~3M one with ~5x the compute per token. Measured on
2 busy shared cores: ``--scale 0.5 --model tiny`` 6.3 min, ``--scale 1 --model tiny`` 10.6 min; the
default (``--scale 1``, small) is estimated from those at ~40 min on 2 quiet cores, not yet measured.

  python benchmarks/recipe_ablation.py                         # default scale
  python benchmarks/recipe_ablation.py --scale 0.3 --model tiny --append   # a busy machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import machine, report  # noqa: E402

LANGS = ("fra_Latn deu_Latn rus_Cyrl jpn_Jpan arb_Arab hin_Deva ell_Grek kor_Hang cmn_Hani amh_Ethi "
         "tzm_Tfng azb_Arab spa_Latn por_Latn ita_Latn nld_Latn pol_Latn tur_Latn vie_Latn ukr_Cyrl").split()
MID_LANGUAGES = 16  # mid-training sees the 16 largest; the decay over "all" adds the other 4
MODELS = {
    # ~3M parameters: 6 layers of width 192 plus a 4096 x 192 embedding.
    "small": {"preset": "tiny", "hidden_size": 192, "intermediate_size": 288, "num_layers": 6,
              "num_attention_heads": 4, "local_attention": 64},
    "tiny": {"preset": "tiny"},
}
STEPS = {"pretrain": 300, "mid": 100, "decay": 100}  # at --scale 1, 16 rows a step
SEQ = {"pretrain": 128, "mid": 256, "decay": 256}
ROWS = 16


def run(cmd, log=None, env=None):
    """Run a command, echoing it; its output goes to ``log`` (the error shows its tail)."""
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    with open(log or os.devnull, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode:
        tail = open(log).read()[-4000:] if log else ""
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.time() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: str, scale: float, model: dict, manifest: str, heldout: str, seed: int) -> dict:
    """The 3-phase run: the quickstart's recipe (tiny_cpu.yaml) with budgets times ``scale``."""
    with open(os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")) as f:
        cfg = yaml.safe_load(f)
    steps = {p: max(8, round(n * scale)) for p, n in STEPS.items()}
    tokens = {p: steps[p] * ROWS * SEQ[p] for p in steps}
    cfg["seed"] = seed
    cfg["model"] = dict(model)
    cfg["data"] = {"manifest": manifest, "eval_manifest": heldout}
    for ph in cfg["phases"]:
        ph["tokens"] = tokens[ph["name"]]
        ph["languages"] = {"pretrain": "top:10", "mid": f"top:{MID_LANGUAGES}", "decay": "all"}[ph["name"]]
    cfg["schedule"]["total_tokens"] = sum(tokens.values())
    cfg["schedule"]["phases"]["decay"]["decay_tokens"] = tokens["decay"]
    cfg["checkpoint"] = {"every_steps": 0, "keep_last": 1}
    cfg["logging"]["eval_interval"] = max(steps.values()) * 4  # held-out numbers come from evaluate
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return steps


def macro(compare: dict, model: str, languages) -> float:
    return sum(compare["languages"][l]["loss"][model] for l in languages) / len(languages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="token budgets (1.0: ~40 min on 2 cores)")
    p.add_argument("--model", choices=sorted(MODELS), default="small", help="small: ~3M parameters; tiny: ~0.6M")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "recipe_ablation"),
                   help="where everything goes; reusing it resumes")
    p.add_argument("--nproc", type=int, default=2, help="training processes (data parallel)")
    p.add_argument("--holdout-docs", type=int, default=16, help="held-out documents per language")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--append", action="store_true", help="append the result section to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be positive")
    t_start = time.time()
    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    log = os.path.join(w, "log.txt")
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    print(f"recipe ablation: scale {args.scale}, model {args.model}, work folder {w} (log: {log})", flush=True)
    times = {}

    # -- data -------------------------------------------------------------------------------------
    corpus, tok, shards = (os.path.join(w, d) for d in ("corpus", "tokenizer", "shards"))
    chars = 200_000  # the quickstart's corpus: naturally skewed (the smallest languages hold a few KB)
    if not os.path.isdir(os.path.join(corpus, "data")):
        run([py, "examples/demo_corpus/build_gettext_corpus.py", "--output", corpus + ".tmp", "--languages", *LANGS,
             "--max-chars-per-language", str(chars)], log, env)
        os.replace(corpus + ".tmp", corpus)
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        run([py, "examples/demo_corpus/train_tokenizer.py", "--corpus", corpus, "--output", tok], log, env)
    times["data"] = run([py, "tools/preprocess_data.py", "--inputs", corpus, "--output", shards, "--tokenizer", tok,
                         "--workers", str(args.nproc), "--chunk_bytes", "104857", "--holdout_docs", str(args.holdout_docs)],
                        log, env)
    heldout = os.path.join(shards, "heldout", "manifest.json")
    config = os.path.join(w, "ablation.yaml")
    steps = write_config(config, args.scale, MODELS[args.model], os.path.join(shards, "manifest.json"), heldout,
                         args.seed)

    # -- training ---------------------------------------------------------------------------------
    def train(name, *extra):
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
               str(free_port()), "pretrain_mmbert.py", "--config", config, "--run_dir", os.path.join(w, name),
               "--data.cache_dir", os.path.join(w, "index-cache"), *extra]
        times[name] = run(cmd, log, env)

    mid = os.path.join(w, "inverse", "checkpoints", "phase_end_mid")
    train("inverse")  # the shared pre-training; its decay is the all-languages variant
    train("constant15", *[a for ph in ("pretrain", "mid", "decay") for a in (f"--phases.{ph}.mask_rate", "0.15")])
    branch = ("--init.checkpoint", mid, "--init.start_phase", "decay")
    train("decay_cont", *branch, "--phases.decay.languages", f"top:{MID_LANGUAGES}")
    train("decay_anchor_heavy", *branch, "--phases.decay.languages", f"top:{MID_LANGUAGES}",
          "--phases.decay.fixed_shares", "{fra_Latn: 0.4}")
    end = lambda run_name: os.path.join(w, run_name, "checkpoints", "phase_end_decay")  # noqa: E731
    times["merge"] = run([py, "tools/ties_merge.py", "--method", "ties", "--base", mid, "--density", "0.5",
                          "--overwrite", "--quiet", "--models", end("decay_anchor_heavy"), end("decay_cont"),
                          end("inverse"), "--out", os.path.join(w, "merged")], log, env)

    # -- evaluation: one compare, the same masked held-out rows for every model --------------------
    links = {"mid": mid, "decay_all": end("inverse"), "decay_cont": end("decay_cont"),
             "decay_anchor_heavy": end("decay_anchor_heavy"), "merged": os.path.join(w, "merged"),
             "constant15": end("constant15")}
    models_dir = os.path.join(w, "models")
    os.makedirs(models_dir, exist_ok=True)
    for name, target in links.items():
        link = os.path.join(models_dir, name)
        if os.path.islink(link):
            os.remove(link)
        os.symlink(os.path.relpath(target, models_dir), link)
    eval_out = os.path.join(w, "eval_heldout")
    times["evaluate"] = run([py, "tools/evaluate.py", "--manifest", heldout, "--size-manifest", shards,
                             "--seq-len", "256", "--tokens-per-language", "4096", "--seed", "0", "--quiet",
                             "--out", eval_out, "--compare", *(os.path.join(models_dir, n) for n in links)], log, env)
    with open(os.path.join(eval_out, "compare.json")) as f:
        compare = json.load(f)

    # -- the claims -------------------------------------------------------------------------------
    from megatron_mmbert.data.shards import load_manifest
    from megatron_mmbert.evaluation.data import resolve_languages

    train_manifest = load_manifest(shards)
    all_langs = sorted(compare["languages"])
    mid_langs = set(resolve_languages(train_manifest, f"top:{MID_LANGUAGES}"))
    added = [l for l in all_langs if l not in mid_langs]
    kept = [l for l in all_langs if l in mid_langs]
    names = list(links)
    rows = {n: (macro(compare, n, all_langs), macro(compare, n, kept), macro(compare, n, added),
                compare["results"][n]["mean"]["macro_accuracy"]) for n in names}
    a_all, a_cont = rows["decay_all"][2], rows["decay_cont"][2]
    b_inv, b_const = rows["decay_all"][0], rows["constant15"][0]
    variants = ("decay_anchor_heavy", "decay_cont", "decay_all")
    merged = rows["merged"][0]
    best_variant = min(variants, key=lambda n: rows[n][0])
    wins = {n: compare["wins"][n] for n in names}

    def verdict(ok: bool) -> str:
        return "reproduced" if ok else "NOT reproduced at this scale"

    params = "~3M" if args.model == "small" else "~0.6M"
    cmd = "python benchmarks/recipe_ablation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        f"## Recipe ablation: annealed languages, inverse masking, TIES merge ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `{cmd}` (scale {args.scale}, model {args.model} {params} parameters, {args.nproc} training processes)",
        f"- machine: {machine()}; wall time {(time.time() - t_start) / 60:.1f} min "
        f"({', '.join(f'{k} {v / 60:.1f}' for k, v in times.items())} min)",
        f"- steps of 16 rows: pretrain {steps['pretrain']} x 128, mid {steps['mid']} x 256, decay {steps['decay']} x 256; "
        f"mid-training languages top:{MID_LANGUAGES}; the decay over all adds {', '.join(added)}",
        f"- held-out: {args.holdout_docs} documents per language never trained on (`--holdout-docs`); "
        "evaluate --compare, seq 256, 4096 tokens per language, mask rate 0.15, seed 0; loss in nats",
        "",
        "| model | macro loss, all 20 | macro loss, 16 mid-training languages | macro loss, 4 added in decay | macro accuracy | languages won |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {rows[n][0]:.4f} | {rows[n][1]:.4f} | {rows[n][2]:.4f} | {rows[n][3]:.4f} | {wins[n]} |")
    lines += [
        "",
        f"- (a) annealed languages: decay over all (tau 0.3) {a_all:.4f} vs mid-training languages only {a_cont:.4f} "
        f"on the {len(added)} added languages ({a_all - a_cont:+.4f}): {verdict(a_all < a_cont)}.",
        f"- (b) inverse masking 30->15->5 {b_inv:.4f} vs constant 15% {b_const:.4f} macro over all languages "
        f"({b_inv - b_const:+.4f}; evaluated at 15% masking, the constant run's own rate): {verdict(b_inv < b_const)}.",
        f"- (c) TIES merge {merged:.4f} vs variants " + ", ".join(f"{v} {rows[v][0]:.4f}" for v in variants)
        + f" (best {best_variant}, {merged - rows[best_variant][0]:+.4f}): "
        + verdict(all(merged < rows[v][0] for v in variants)) + ".",
    ]
    report(lines, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
