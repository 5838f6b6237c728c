#!/usr/bin/env bash
# The whole mmBERT pipeline at toy scale on a CPU machine, in a few minutes:
#   demo corpus -> tokenizer -> shards -> index -> 3-phase run (2 processes) -> 3 decay variants
#   from the mid-training checkpoint -> TIES merge -> Hugging Face export -> held-out evaluation of
#   mid / variants / merge side by side -> plots of the schedule, the loss and the comparison.
#
#   bash examples/quickstart.sh [OUT_DIR]        (default: runs/quickstart; rerunning resumes, and
#                                                 after a finished pass trains and merges nothing)
#
# Needs Python 3.10+ and the gettext catalogs of /usr/share/locale (any Debian/Ubuntu image; else
# apt-get install -y gettext iso-codes). Installs torch (CPU) and this package when missing, with
# install.sh, and runs every step with the interpreter install.sh chose (the active environment,
# else this repository's .venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-runs/quickstart}" && cd "${1:-runs/quickstart}" && pwd)"
NPROC="${NPROC:-2}"
PY="$(bash "$ROOT/install.sh" --print-python)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# -- 0. install what is missing --------------------------------------------------------------
if ! "$PY" -c "import megatron_mmbert.data._index_builder, megatron.core, tensorboard, matplotlib" 2>/dev/null; then
  say "installing torch (CPU, if missing), megatron-mmbert and its dependencies"
  bash "$ROOT/install.sh"
fi
echo "Python: $PY"
if [ ! -d /usr/share/locale ]; then
  echo "no /usr/share/locale: install gettext catalogs (apt-get install -y gettext iso-codes)" >&2
  exit 1
fi

LANGS="fra_Latn deu_Latn rus_Cyrl jpn_Jpan arb_Arab hin_Deva ell_Grek kor_Hang cmn_Hani amh_Ethi
       tzm_Tfng azb_Arab spa_Latn por_Latn ita_Latn nld_Latn pol_Latn tur_Latn vie_Latn ukr_Cyrl"
CONFIG=examples/configs/tiny_cpu.yaml
COMMON=(--data.manifest "$OUT/shards/manifest.json" --data.cache_dir "$OUT/index-cache")
RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29517}" pretrain_mmbert.py)
TRAINED=0  # set when this pass trained anything: the merge and the export are then redone

# train RUN_DIR [OVERRIDES...]: train (or resume) the run in RUN_DIR; a run that already ended its
# last phase is not relaunched (the trainer's own --is-complete says so, in one process), so a second
# pass of this script trains nothing.
train() {
  local dir=$1
  shift
  if "$PY" pretrain_mmbert.py --config "$CONFIG" --run_dir "$dir" "${COMMON[@]}" "$@" --is-complete 2>/dev/null; then
    echo "run already complete: $dir (not relaunched)"
  else
    "${RUN[@]}" --config "$CONFIG" --run_dir "$dir" "${COMMON[@]}" "$@"
    TRAINED=1
  fi
}

# -- 1. data ----------------------------------------------------------------------------------
if [ ! -d "$OUT/corpus/data" ]; then
  say "1/7 demo corpus (gettext catalogs, 20 languages in 11 scripts)"
  # shellcheck disable=SC2086
  "$PY" examples/demo_corpus/build_gettext_corpus.py --output "$OUT/corpus.tmp" --languages $LANGS \
      --max-chars-per-language 200000
  mv "$OUT/corpus.tmp" "$OUT/corpus"
fi
if [ ! -f "$OUT/tokenizer/tokenizer.json" ]; then
  say "2/7 tokenizer (byte-level BPE, 4096 ids)"
  "$PY" examples/demo_corpus/train_tokenizer.py --corpus "$OUT/corpus" --output "$OUT/tokenizer"
fi
say "3/7 preprocess to per-language Megatron shards, holding out 8 documents per language"
"$PY" tools/preprocess_data.py --inputs "$OUT/corpus" --output "$OUT/shards" --tokenizer "$OUT/tokenizer" \
    --workers "$NPROC" --chunk_bytes 104857 --holdout_docs 8
say "4/7 blended + packed index of the three phases"
"$PY" tools/build_data_index.py --config "$CONFIG" "${COMMON[@]}" --rows 6 | tee "$OUT/index_plan.txt"
PLAN="$(sed -n 's/.*; plan: //p' "$OUT/index_plan.txt")"

# -- 2. the three-phase run -------------------------------------------------------------------
say "5/7 train pretrain -> mid -> decay ($NPROC processes)"
train "$OUT/train"
MID="$OUT/train/checkpoints/phase_end_mid"

# -- 3. decay variants from the mid-training checkpoint ------------------------------------------
# Each keeps the run's phase list and starts at its decay phase (--init.start_phase decay), so its
# data continues where mid-training stopped; the run checks that against $MID. The demo corpus has
# no English (gettext's source language), so the "English-heavy" variant pins its largest language,
# French, at 40%.
say "6/7 three decay variants branching from $MID"
for v in anchor_heavy cont all; do
  case $v in
    anchor_heavy) extra=(--phases.decay.languages top:16 --phases.decay.fixed_shares "{fra_Latn: 0.4}") ;;
    cont)         extra=(--phases.decay.languages top:16) ;;
    all)          extra=(--phases.decay.languages all) ;;
  esac
  train "$OUT/decay_$v" --init.checkpoint "$MID" --init.start_phase decay --checkpoint.every_steps 0 "${extra[@]}"
done

# -- 4. TIES merge and Hugging Face export --------------------------------------------------------
say "7/7 TIES-merge the variants (base: $MID) and export to Hugging Face"
if [ "$TRAINED" = 0 ] && [ -f "$OUT/merged/merge_report.json" ] && [ -f "$OUT/hf/config.json" ]; then
  echo "merge and export already done from these runs: $OUT/merged, $OUT/hf"
else
  "$PY" tools/ties_merge.py --spec.method ties --base "$MID" --spec.density 0.5 --overwrite --quiet \
      --models "$OUT"/decay_{anchor_heavy,cont,all}/checkpoints/phase_end_decay --out "$OUT/merged"
  "$PY" tools/convert_checkpoint.py export-hf --load "$OUT/merged" --out "$OUT/hf" --overwrite
fi

# -- 5. held-out evaluation and plots --------------------------------------------------------------
# The same masked rows of the held-out documents (never trained on) for every model; resource groups
# by the training manifest's sizes. A rerun reuses the models already scored.
# The table's columns are the models' folder names: short links name them.
say "evaluate mid, the three variants and the merge on the held-out documents"
mkdir -p "$OUT/models"
ln -sfn ../train/checkpoints/phase_end_mid "$OUT/models/mid"
for v in anchor_heavy cont all; do ln -sfn "../decay_$v/checkpoints/phase_end_decay" "$OUT/models/decay_$v"; done
ln -sfn ../merged "$OUT/models/merged"
"$PY" tools/evaluate.py --manifest "$OUT/shards/heldout" --size_manifest "$OUT/shards" --seq_len 256 \
    --tokens_per_language 2048 --out "$OUT/eval_heldout" --quiet \
    --compare "$OUT"/models/{mid,decay_anchor_heavy,decay_cont,decay_all,merged}
PLOTS=()
if "$PY" -c "import matplotlib" 2>/dev/null; then
  say "plots"
  for args in "schedule $PLAN" "loss $OUT/train" "compare $OUT/eval_heldout"; do
    # shellcheck disable=SC2086
    PLOTS+=("$("$PY" tools/plot.py $args | sed -n 's/^wrote //p')")
  done
else
  echo "plots skipped: matplotlib is not installed (pip install 'megatron-mmbert[plots]', or rerun install.sh)"
fi

# -- summary --------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]

def phases(run):
    rows = [json.loads(l) for l in open(os.path.join(out, run, "metrics.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    by = {}
    for r in train:
        by.setdefault(r["phase"], []).append(r["loss"])
    return by, [r for r in rows if r["kind"] == "eval"]

print("\nMLM loss per phase (mean of the first / last 3 logged steps):")
for run in ("train", "decay_anchor_heavy", "decay_cont", "decay_all"):
    by, evals = phases(run)
    for phase, losses in by.items():
        a, b = sum(losses[:3]) / len(losses[:3]), sum(losses[-3:]) / len(losses[-3:])
        print(f"  {run:20s} {phase:9s} {a:.3f} -> {b:.3f} ({len(losses)} log lines)")
    if evals:
        print(f"  {run:20s} eval at step {evals[-1]['step']}: " +
              ", ".join(f"{g} {v:.3f}" for g, v in evals[-1]["losses"].items()))

from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained(os.path.join(out, "hf"))
tok = AutoTokenizer.from_pretrained(os.path.join(out, "hf"))
print(f"\nHugging Face export loads: {type(model).__name__}, "
      f"{sum(p.numel() for p in model.parameters()):,} parameters, tokenizer {len(tok)} ids")
print(f"""
Written under {out}:
  corpus/, tokenizer/, shards/ (manifest.json), index-cache/
  train/            3-phase run: resolved_config.yaml, metrics.jsonl, tensorboard/, checkpoints/phase_end_*
  decay_*/          the three decay variants (from train/checkpoints/phase_end_mid)
  merged/           TIES merge of the variants (megatron dist checkpoint)
  hf/               Hugging Face ModernBertForMaskedLM (AutoModelForMaskedLM.from_pretrained)
  models/           links naming the compared checkpoints
  eval_heldout/     held-out comparison: compare.json/.csv, one eval.json per model
TensorBoard: {sys.executable} -m tensorboard.main --logdir {out}
""")
EOF
if [ "${#PLOTS[@]}" -gt 0 ]; then
  echo "Plots:"
  printf '  %s\n' "${PLOTS[@]}"
fi
