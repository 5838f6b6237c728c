"""mmBERT's three recipe claims in miniature, on CPU, over several seeds (arXiv:2509.06888).

(a) Annealed language learning: a decay over *all* languages at tau 0.3 against a decay over the
    mid-training languages only, scored on the languages the decay adds (and on the others).
(b) Inverse masking: 30% -> 15% -> 5% over pretrain / mid / decay against a constant 15% (a second,
    separate run with the same token budgets), scored at 5%, 15% and 30% masking: each run's own
    rates, so neither is favoured by the scoring rate.
(c) TIES merge of the three decay variants (English-heavy-like: the largest language pinned at 40%;
    mid-training languages; all languages), judged as the paper does: it should keep most of
    Decay-All's gain on the added languages (merged vs the mid-training-only decay there) without
    losing on the languages trained all along (merged vs Decay-All there).

Every comparison is a paired difference per seed (the same data, the same held-out rows and masks;
the seed moves initialisation, data order and training masks), reported as mean and spread (sample
standard deviation over the seeds). A verdict is given only where |mean| > 2 x spread; otherwise the
line says "undecided at this scale". Losses are held-out MLM losses in nats, macro over the languages
of a group: "trained all along" (the mid-training languages) and "added in the decay". The labelled
(loss-carrying) token counts of training and of the evaluation are printed beside them.

Steps, all through the repository's own tools (each resumes when the work folder is reused):
demo corpus (gettext catalogs, 20 languages) -> tokenizer -> ``tools/preprocess_data.py
--holdout-docs`` -> per seed: ``pretrain_mmbert.py`` (torchrun) for the shared 3-phase run ("inverse":
its decay is the all-languages variant) and for the constant-15% run -> two decay branches from the
shared ``phase_end_mid`` -> ``tools/ties_merge.py`` -> ``tools/evaluate.py --compare`` of all of them
on the held-out manifest at each scoring mask rate.

``--scale`` multiplies the phase token budgets (1.0: 300 / 100 / 100 steps of 16 rows); ``--model tiny``
is the quickstart's 0.6M model, ``small`` (default) a ~3M one with ~5x the compute per token.
``--seeds`` (>= 3) runs the whole training per seed. Measured on 2 shared cores under ``nice -n 19``,
3 seeds of the tiny model: ``--scale 0.1`` 8.6 min, ``--scale 0.5`` 14.1 min (benchmarks/RESULTS.md).

  python benchmarks/recipe_ablation.py --seeds 3                       # default scale, ~3M model
  nice -n 19 python benchmarks/recipe_ablation.py --seeds 3 --scale 0.1 --model tiny --append   # a busy machine
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


GROUPS = ("trained all along", "added in decay")
SCORE_RATES = (0.05, 0.15, 0.30)
MODEL_NAMES = ("mid", "decay_all", "decay_cont", "decay_anchor_heavy", "merged", "constant15")


def macro(compare: dict, model: str, languages) -> float:
    return sum(compare["languages"][l]["loss"][model] for l in languages) / len(languages)


def mean_spread(values):
    """(mean, sample standard deviation) of a list of numbers."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def decide(diffs, better: str, worse: str) -> str:
    """The verdict of paired differences (loss of A minus loss of B, per seed): only where the mean
    exceeds twice the spread."""
    m, sd = mean_spread(diffs)
    if len(diffs) < 3 or not abs(m) > 2 * sd:
        return f"{m:+.4f} +- {sd:.4f}: undecided at this scale"
    return f"{m:+.4f} +- {sd:.4f}: " + (better if m < 0 else worse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="token budgets (1.0: 300/100/100 steps of 16 rows)")
    p.add_argument("--model", choices=sorted(MODELS), default="small", help="small: ~3M parameters; tiny: ~0.6M")
    p.add_argument("--seeds", type=int, default=3, help="training seeds (>= 3 for verdicts)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "recipe_ablation"),
                   help="where everything goes; reusing it resumes")
    p.add_argument("--nproc", type=int, default=2, help="training processes (data parallel)")
    p.add_argument("--holdout-docs", type=int, default=16, help="held-out documents per language")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out row capacity evaluated per language")
    p.add_argument("--seed", type=int, default=21, help="the first training seed (then seed+1, ...)")
    p.add_argument("--append", action="store_true", help="append the result section to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be positive")
    if args.seeds < 1:
        p.error("--seeds must be >= 1 (verdicts need 3)")
    t_start = time.time()
    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    log = os.path.join(w, "log.txt")
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    print(f"recipe ablation: {args.seeds} seed(s), scale {args.scale}, model {args.model}, work folder {w} "
          f"(log: {log})", flush=True)
    times = {}

    # -- data (shared by every seed) ---------------------------------------------------------------
    corpus, tok, shards = (os.path.join(w, d) for d in ("corpus", "tokenizer", "shards"))
    chars = 200_000  # the quickstart's corpus: naturally skewed (the smallest languages hold a few KB)
    if not os.path.isdir(os.path.join(corpus, "data")):
        run([py, "examples/demo_corpus/build_gettext_corpus.py", "--output", corpus + ".tmp", "--languages", *LANGS,
             "--max-chars-per-language", str(chars)], log, env)
        os.replace(corpus + ".tmp", corpus)
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        run([py, "examples/demo_corpus/train_tokenizer.py", "--corpus", corpus, "--output", tok], log, env)
    times["data"] = run([py, "tools/preprocess_data.py", "--inputs", corpus, "--output", shards, "--tokenizer", tok,
                         "--workers", str(args.nproc), "--chunk_bytes", "104857", "--holdout_docs", str(args.holdout_docs),
                         "--language_list", "none"], log, env)
    heldout = os.path.join(shards, "heldout", "manifest.json")

    from megatron_mmbert.data.shards import load_manifest
    from megatron_mmbert.evaluation.data import resolve_languages

    mid_langs = set(resolve_languages(load_manifest(shards), f"top:{MID_LANGUAGES}"))

    # -- per seed: the runs, the merge, the evaluation at each scoring rate -------------------------
    results = []  # per seed: {rate: compare.json}
    for k in range(args.seeds):
        seed = args.seed + k
        sw = os.path.join(w, f"seed{seed}")
        os.makedirs(sw, exist_ok=True)
        config = os.path.join(sw, "ablation.yaml")
        steps = write_config(config, args.scale, MODELS[args.model], os.path.join(shards, "manifest.json"),
                             heldout, seed)

        def train(name, *extra):
            if os.path.isdir(os.path.join(sw, name, "checkpoints", "phase_end_decay")):
                return  # done by an earlier call: resume
            cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
                   str(free_port()), "pretrain_mmbert.py", "--config", config, "--run_dir", os.path.join(sw, name),
                   "--data.cache_dir", os.path.join(w, "index-cache"), "--data.language_list", "none", *extra]
            times[name] = times.get(name, 0.0) + run(cmd, log, env)

        mid = os.path.join(sw, "inverse", "checkpoints", "phase_end_mid")
        train("inverse")  # the shared pre-training; its decay is the all-languages variant
        train("constant15", *[a for ph in ("pretrain", "mid", "decay") for a in (f"--phases.{ph}.mask_rate", "0.15")])
        branch = ("--init.checkpoint", mid, "--init.start_phase", "decay")
        train("decay_cont", *branch, "--phases.decay.languages", f"top:{MID_LANGUAGES}")
        train("decay_anchor_heavy", *branch, "--phases.decay.languages", f"top:{MID_LANGUAGES}",
              "--phases.decay.fixed_shares", "{fra_Latn: 0.4}")
        end = lambda run_name: os.path.join(sw, run_name, "checkpoints", "phase_end_decay")  # noqa: E731
        times["merge"] = times.get("merge", 0.0) + run(
            [py, "tools/ties_merge.py", "--method", "ties", "--base", mid, "--density", "0.5", "--overwrite", "--quiet",
             "--models", end("decay_anchor_heavy"), end("decay_cont"), end("inverse"), "--out",
             os.path.join(sw, "merged")], log, env)
        links = {"mid": mid, "decay_all": end("inverse"), "decay_cont": end("decay_cont"),
                 "decay_anchor_heavy": end("decay_anchor_heavy"), "merged": os.path.join(sw, "merged"),
                 "constant15": end("constant15")}
        models_dir = os.path.join(sw, "models")
        os.makedirs(models_dir, exist_ok=True)
        for name, target in links.items():
            link = os.path.join(models_dir, name)
            if os.path.islink(link):
                os.remove(link)
            os.symlink(os.path.relpath(target, models_dir), link)
        per_rate = {}
        for rate in SCORE_RATES:
            eval_out = os.path.join(sw, f"eval_mask{int(rate * 100):02d}")
            times["evaluate"] = times.get("evaluate", 0.0) + run(
                [py, "tools/evaluate.py", "--manifest", heldout, "--size-manifest", shards, "--seq-len", "256",
                 "--tokens-per-language", str(args.eval_tokens), "--seed", "0", "--mask-rate", str(rate), "--quiet",
                 "--out", eval_out, "--compare", *(os.path.join(models_dir, n) for n in links)], log, env)
            with open(os.path.join(eval_out, "compare.json")) as f:
                per_rate[rate] = json.load(f)
        results.append(per_rate)

    # -- tables and verdicts ----------------------------------------------------------------------
    all_langs = sorted(results[0][SCORE_RATES[0]]["languages"])
    groups = {GROUPS[0]: [l for l in all_langs if l in mid_langs], GROUPS[1]: [l for l in all_langs if l not in mid_langs]}

    def score(k, rate, model, group):
        return macro(results[k][rate], model, groups[group])

    def paired(rate, a, b, group):
        return [score(k, rate, a, group) - score(k, rate, b, group) for k in range(len(results))]

    with open(os.path.join(w, f"seed{args.seed}", "ablation.yaml")) as f:
        phases = {ph["name"]: ph for ph in yaml.safe_load(f)["phases"]}
    trained = {ph: phases[ph]["tokens"] for ph in ("pretrain", "mid", "decay")}
    inverse_rates = {ph: phases[ph]["mask_rate"] for ph in trained}
    labelled_inverse = sum(trained[ph] * inverse_rates[ph] for ph in trained)
    labelled_const = sum(trained[ph] * 0.15 for ph in trained)
    eval_labelled = {}  # masked (scored) held-out tokens per rate: the same for every model and seed
    for rate in SCORE_RATES:
        with open(os.path.join(w, f"seed{args.seed}", f"eval_mask{int(rate * 100):02d}", "mid", "eval.json")) as f:
            eval_labelled[rate] = sum(v["masked_tokens"] for v in json.load(f)["languages"].values())
    params = "~3M" if args.model == "small" else "~0.6M"
    cmd = "python benchmarks/recipe_ablation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    seeds = ", ".join(str(args.seed + k) for k in range(args.seeds))
    lines = [
        f"## Recipe ablation over {args.seeds} seeds: annealed languages, inverse masking, TIES merge "
        f"({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `{cmd}` (seeds {seeds}; scale {args.scale}; model {args.model}, {params} parameters; "
        f"{args.nproc} training processes)",
        f"- machine: {machine()}; wall time {(time.time() - t_start) / 60:.1f} min "
        f"({', '.join(f'{k} {v / 60:.1f}' for k, v in times.items())} min, all seeds)",
        f"- training per run: pretrain {trained['pretrain']:,} tokens ({steps['pretrain']} steps x 16 rows x 128), "
        f"mid {trained['mid']:,} ({steps['mid']} x 16 x 256), decay {trained['decay']:,} ({steps['decay']} x 16 x 256); "
        f"labelled (loss-carrying) tokens: inverse {labelled_inverse:,.0f} "
        f"({' / '.join(f'{inverse_rates[ph]:g}' for ph in trained)}), constant15 {labelled_const:,.0f}",
        f"- groups: trained all along = the {len(groups[GROUPS[0]])} mid-training languages (top:{MID_LANGUAGES}); "
        f"added in decay = {', '.join(groups[GROUPS[1]])} (only the all-languages decay trains on them)",
        f"- held-out: {args.holdout_docs} documents per language never trained on; evaluate --compare, seq 256, "
        f"{args.eval_tokens} tokens per language, the same rows and masks for every model (eval seed 0); labelled "
        "tokens scored over the 20 languages: " + ", ".join(f"{int(r * 100)}% {eval_labelled[r]:,}" for r in SCORE_RATES),
        "- cells: macro held-out loss (nats), mean +- sample standard deviation over the seeds",
        "",
        "| model | " + " | ".join(f"{g}, {int(r * 100)}% masking" for r in SCORE_RATES for g in GROUPS) + " |",
        "|---|" + "---|" * (len(SCORE_RATES) * len(GROUPS)),
    ]
    for n in MODEL_NAMES:
        cells = []
        for r in SCORE_RATES:
            for g in GROUPS:
                m, sd = mean_spread([score(k, r, n, g) for k in range(len(results))])
                cells.append(f"{m:.4f} +- {sd:.4f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (first minus second, per seed; negative: the first is better); a verdict "
              "only where |mean| > 2 x spread:", ""]
    for r in SCORE_RATES:
        pct = f"{int(r * 100)}%"
        lines += [
            f"- ({pct} masking) (a) annealed languages, decay_all - decay_cont on the added languages: "
            + decide(paired(r, "decay_all", "decay_cont", GROUPS[1]), "reproduced (adding them in the decay helps)",
                     "contradicted"),
            f"- ({pct} masking) (a') the same on the languages trained all along: "
            + decide(paired(r, "decay_all", "decay_cont", GROUPS[0]), "adding languages also helps these",
                     "adding languages costs these"),
        ]
        for g in GROUPS:
            lines.append(f"- ({pct} masking) (b) inverse masking, decay_all - constant15, {g}: "
                         + decide(paired(r, "decay_all", "constant15", g), "reproduced (inverse better)",
                                  "contradicted (constant 15% better)"))
        lines += [
            f"- ({pct} masking) (c) TIES keeps the low-resource gain, merged - decay_cont on the added languages: "
            + decide(paired(r, "merged", "decay_cont", GROUPS[1]), "reproduced", "contradicted"),
            f"- ({pct} masking) (c') TIES costs nothing where all variants trained, merged - decay_all on the "
            "languages trained all along: "
            + decide(paired(r, "merged", "decay_all", GROUPS[0]), "merged better", "merged worse"),
        ]
    report(lines, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
