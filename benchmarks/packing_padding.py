"""Padding of best_fit packing at mmBERT's sequence lengths, beside the reference loop's figure.

Goal (issue 26): padding at most 0.1% of row tokens at seq 1024 and at most 0.5% at 8192, with the
shipped geometry (``data.packed_row: micro_batch``: packed rows of micro_batch_size x seq_len, 48 x
1024 in pre-training, 6 x 8192 after), on the synthetic FineWeb2-shaped manifest of
``benchmarks/index_at_scale.py`` (1833 languages, log-normal document lengths, the mmBERT schedule
scaled by ``--scale``), and reported on the quickstart corpus.

For each corpus it builds the index (``build_data_index``, seed 21) with the micro_batch geometry and
with rows of seq_len (``data.packed_row: seq_len``, the SDPA option), and reads per phase the plan's
``pad_fraction`` and dropped tokens (pieces under 32 content tokens and the look-ahead left at a phase's
end). The anchor is the reference loop (tests/helpers/reference_packer.py: bert24 / ModernBERT's
``GreedyBestFitSequencePacker``, buffer 5120, a device batch of 12 packed rows) run on the same corpus's
documents framed the same way, in one shuffled multilingual stream as the reference reads them.

    PYTHONPATH=. python benchmarks/packing_padding.py [--scale 0.0001] [--quickstart-manifest M]
        [--no-quickstart] [--append]

Without ``--quickstart-manifest`` the quickstart corpus is built as examples/quickstart.sh builds it
(20 gettext languages, 200k characters each, its byte-level BPE tokenizer, shards), which needs
/usr/share/locale.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import machine, report  # noqa: E402
from benchmarks.index_at_scale import GLOBAL_BATCH, _mmbert_phases, write_manifest  # noqa: E402

QUICKSTART_LANGUAGES = ("fra_Latn deu_Latn rus_Cyrl jpn_Jpan arb_Arab hin_Deva ell_Grek kor_Hang cmn_Hani amh_Ethi "
                        "tzm_Tfng azb_Arab spa_Latn por_Latn ita_Latn nld_Latn pol_Latn tur_Latn vie_Latn ukr_Cyrl").split()
MICRO_BATCH = {1024: 48, 8192: 6}
"""mmbert_base.yaml's micro-batch sizes: 48 rows at 1024 (pre-training), 6 at 8192 (mid, decay)."""
DEVICE_BATCH_PACKED_ROWS = 12
"""The reference's packed rows open per device batch (mmBERT: 4608 rows over 8 GPUs / 48 = 12)."""
REFERENCE_BATCHES = 24


def build_quickstart(work: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], check=True, env=env, cwd=ROOT)  # noqa: E731
    run("examples/demo_corpus/build_gettext_corpus.py", "--output", f"{work}/corpus", "--languages",
        *QUICKSTART_LANGUAGES, "--max-chars-per-language", "200000")
    run("examples/demo_corpus/train_tokenizer.py", "--corpus", f"{work}/corpus", "--output", f"{work}/tokenizer")
    run("tools/preprocess_data.py", "--inputs", f"{work}/corpus", "--output", f"{work}/shards",
        "--tokenizer", f"{work}/tokenizer", "--workers", "2", "--chunk_bytes", "104857")
    return f"{work}/shards/manifest.json"


def quickstart_phases(manifest):
    """Two phases over all the corpus's languages at mmBERT's lengths, ~2 epochs of it each."""
    from megatron_mmbert.config import PhaseConfig

    total = sum(e.tokens for e in manifest.languages.values())
    return [PhaseConfig(name=f"seq{s}", tokens=2 * total, seq_len=s, temperature=0.5,
                        global_batch_size=MICRO_BATCH[s] * DEVICE_BATCH_PACKED_ROWS) for s in (1024, 8192)]


def index_padding(manifest, phases, bin_rows):
    from megatron_mmbert.data.index import build_data_index

    t = time.perf_counter()
    index = build_data_index(manifest, phases, 21, None, GLOBAL_BATCH, is_builder=True, packing="best_fit",
                             bin_rows=bin_rows)
    out = []
    for p in index.plan["phases"]:
        pk = p["packing"]
        rows = p["samples"] * p["seq_len"]
        out.append({"phase": p["name"], "seq_len": p["seq_len"], "packed_row": pk["rows_per_packed_row"],
                    "pad": pk["pad_fraction"], "dropped": pk["dropped_tokens"] / rows,
                    "bos": pk["bos_start_fraction"], "eos": pk["eos_end_fraction"]})
    return out, time.perf_counter() - t


def reference_padding_of(manifest, seq_len: int, seed: int = 0) -> float:
    """The reference loop's padding on the manifest's documents (content = stored tokens less any
    stored <bos>/<eos>), all languages in one shuffled stream, at mmBERT's geometry for seq_len."""
    from megatron_mmbert.data.index import FRAMING_BOS, FRAMING_EOS, document_lengths, framing_flags
    from tests.helpers.reference_packer import reference_padding, reference_sequences

    parts = []
    for lang, entry in manifest.languages.items():
        if entry.tokens <= 0:
            continue
        n = document_lengths(entry.shards).astype(np.int64)
        f = framing_flags(manifest, lang)
        parts.append(n - (f & FRAMING_BOS > 0) - (f & FRAMING_EOS > 0))
    content = np.concatenate(parts)
    content = content[np.random.default_rng(seed).permutation(len(content))]
    mbs = MICRO_BATCH[seq_len]
    need = REFERENCE_BATCHES * DEVICE_BATCH_PACKED_ROWS * mbs * seq_len
    reps = int(np.ceil(2 * need / max(content.sum(), 1)))  # small corpora: epochs one after the other
    content = np.tile(content, max(reps, 1))
    lengths = reference_sequences(content[content > 0].tolist(), seq_len)
    return reference_padding(lengths, DEVICE_BATCH_PACKED_ROWS * mbs, mbs, seq_len, REFERENCE_BATCHES)


def measure(name: str, manifest_path: str, phases):
    from megatron_mmbert.data.shards import load_manifest

    manifest = load_manifest(manifest_path)
    bins = [MICRO_BATCH[p.seq_len] for p in phases]
    rows = []
    micro, secs = index_padding(manifest, phases, bins)
    flat, secs_flat = index_padding(manifest, phases, None)
    refs = {s: reference_padding_of(manifest, s) for s in sorted({p.seq_len for p in phases})}
    for m, f in zip(micro, flat):
        rows.append({"corpus": name, **m, "pad_seq_len_rows": f["pad"], "reference_pad": refs[m["seq_len"]],
                     "build_s": round(secs, 1)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.0001, help="synthetic manifest and schedule x this")
    ap.add_argument("--quickstart-manifest", default=None)
    ap.add_argument("--no-quickstart", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--append", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    from megatron_mmbert.config import PhaseConfig

    work = args.workdir or tempfile.mkdtemp(prefix="packing-padding-")
    rows = []
    synth = os.path.join(work, f"synthetic-{args.scale:g}", "manifest.json")
    if not os.path.exists(synth):
        write_manifest(os.path.dirname(synth), args.scale)
    phases, _ = _mmbert_phases(args.scale)
    rows += measure(f"synthetic 1833 langs 1/{1 / args.scale:g}", synth, [PhaseConfig(**p) for p in phases])
    if not args.no_quickstart:
        qs = args.quickstart_manifest or build_quickstart(os.path.join(work, "quickstart"))
        from megatron_mmbert.data.shards import load_manifest

        rows += measure("quickstart 20 langs", qs, quickstart_phases(load_manifest(qs)))
    for r in rows:
        print(json.dumps(r), file=sys.stderr)
    cmd = "PYTHONPATH=. python benchmarks/packing_padding.py" + (f" --scale {args.scale:g}" if args.scale != 0.0001 else "")
    lines = [f"## Packing padding: best_fit packed rows of micro_batch x seq_len vs the reference loop "
             f"({datetime.date.today().isoformat()}, issue 26)", "",
             f"Machine: {machine()}. Command: `{cmd}`. Padding in % of row tokens; dropped: % of row tokens "
             "read but not trained (non-first pieces under 32 content tokens, look-ahead left at a phase's end).",
             "Anchor: the reference loop (bert24 / ModernBERT `GreedyBestFitSequencePacker`, re-implemented in "
             "tests/helpers/reference_packer.py; buffer 5120, 12 packed rows per device batch) on the same "
             "corpus's documents in one shuffled stream, 24 batches.", "",
             "| corpus | phase | seq | packed row | padding % (micro_batch rows) | reference loop % | ratio | "
             "padding % (seq_len rows) | dropped % | <bos> / <eos> framed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["pad"] / r["reference_pad"] if r["reference_pad"] else float("inf")
        lines.append(f"| {r['corpus']} | {r['phase']} | {r['seq_len']} | {r['packed_row']} x {r['seq_len']} | "
                     f"**{100 * r['pad']:.4f}** | {100 * r['reference_pad']:.4f} | {ratio:.2f}x | "
                     f"{100 * r['pad_seq_len_rows']:.3f} | {100 * r['dropped']:.3f} | "
                     f"{100 * r['bos']:.0f}% / {100 * r['eos']:.0f}% |")
    report(lines, args.append)


if __name__ == "__main__":
    main()
