"""``evaluate(cfg)``: rows once, then each model over them; results, means, groups and files."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import sys
from typing import Dict, List, Tuple

import torch

from megatron_mmbert.config_base import ConfigError, check, to_dict
from megatron_mmbert.evaluation import data as eval_data
from megatron_mmbert.evaluation import metrics
from megatron_mmbert.evaluation.config import EvaluateConfig
from megatron_mmbert.evaluation.models import all_reduce, checkpoint_kind, open_scorer
from megatron_mmbert.fileio import OUTPUT_MARKER, OutputRefused, atomic_write_json, atomic_write_text
from megatron_mmbert.progress import Progress

logger = logging.getLogger(__name__)

OUTPUT_KIND = "evaluate"


def prepare_output(out: str) -> str:
    """Create ``out`` or accept it when empty or a previous evaluate output (its marker says so);
    only this tool's own file names are ever replaced in it."""
    import json

    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise OutputRefused(f"out={out!r} exists and is not a folder; choose a new output folder")
        kind = None
        marker = os.path.join(out, OUTPUT_MARKER)
        if os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    kind = json.load(f).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
        if os.listdir(out) and kind != OUTPUT_KIND:
            raise OutputRefused(f"out={out!r} is not empty and not an evaluate output (no {OUTPUT_MARKER} "
                                f"of kind {OUTPUT_KIND!r}); choose a new output folder")
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, OUTPUT_MARKER), {"kind": OUTPUT_KIND})
    return os.path.abspath(out)


def model_names(paths: List[str]) -> List[str]:
    """Short unique column names for models: the folder name, with its parent when two collide."""
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._") or "model"

    names = [clean(os.path.basename(os.path.normpath(p))) for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            parts = os.path.normpath(os.path.abspath(p)).split(os.sep)
            names[i] = clean("_".join(parts[-2:]))
    reserved = {"eval.json", "eval.csv", "compare.json", "compare.csv", OUTPUT_MARKER}
    names = [f"{n}_model" if n in reserved else n for n in names]
    for i in range(len(names)):
        if names.count(names[i]) > 1:
            names[i] = f"{names[i]}_{i}"
    return names


def score_model(scorer, rows: List[eval_data.LanguageRows], quiet: bool, label: str) -> Dict[str, torch.Tensor]:
    """Per language float64 [loss sum, masked, correct] over all rows, the same on every rank."""
    sums = torch.zeros(len(rows), 3, dtype=torch.float64)
    progress = Progress(label, len(rows), "languages", None if quiet or not _is_rank0() else sys.stderr, every_s=0)
    for i, lang_rows in enumerate(rows):
        mine, _ = eval_data.split_rows(lang_rows.batches, scorer.dp_rank, scorer.dp_size)
        for batch in mine:
            logits = scorer.logits(batch)
            if logits is not None:
                sums[i] += metrics.mlm_sums(logits, batch["labels"], scorer.vocab_size)
        progress.advance(1, lang_rows.language)
    sums = all_reduce(sums, scorer.device)
    return {r.language: sums[i] for i, r in enumerate(rows)}


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_rows(cfg: EvaluateConfig, manifest, languages: List[str]) -> List[eval_data.LanguageRows]:
    return [eval_data.language_rows(manifest, lang, cfg.seq_len, cfg.mask_rate, cfg.tokens_per_language,
                                    cfg.seed, cfg.micro_batch_rows, cfg.mask_special_tokens)
            for lang in languages]


def settings(cfg: EvaluateConfig, manifest_path: str) -> Dict:
    return {"manifest": manifest_path, "seq_len": cfg.seq_len, "mask_rate": cfg.mask_rate,
            "tokens_per_language": cfg.tokens_per_language, "seed": cfg.seed, "languages": cfg.languages,
            "mask_special_tokens": cfg.mask_special_tokens,
            "groups": "terciles of the languages evaluated, by tokens in "
                      + (cfg.size_manifest or manifest_path)}


def eval_csv(result: Dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["language", "group", "loss", "accuracy", "masked_tokens", "rows", "tokens"])
    group_of = {lang: g for g, r in result["groups"].items() for lang in r["members"]}
    for lang, r in result["languages"].items():
        w.writerow([lang, group_of.get(lang, ""), f"{r['loss']:.6f}", f"{r['accuracy']:.6f}",
                    r["masked_tokens"], r["rows"], r["tokens"]])
    m = result["mean"]
    w.writerow(["mean_token_weighted", "", f"{m['loss']:.6f}", f"{m['accuracy']:.6f}", m["masked_tokens"], "", ""])
    w.writerow(["mean_language_macro", "", f"{m['macro_loss']:.6f}", f"{m['macro_accuracy']:.6f}", m["masked_tokens"], "", ""])
    for g, r in result["groups"].items():
        w.writerow([f"group_{g}", g, f"{r['loss']:.6f}", f"{r['accuracy']:.6f}", r["masked_tokens"], "", ""])
    return buf.getvalue()


def compare_csv(table: Dict) -> str:
    names = table["models"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["language"] + [f"{n}_loss" for n in names] + [f"{n}_accuracy" for n in names] + ["winner"])
    for lang, r in list(table["languages"].items()) + list(table["summary"].items()):
        w.writerow([lang] + [f"{r['loss'][n]:.6f}" for n in names] + [f"{r['accuracy'][n]:.6f}" for n in names]
                   + [r["winner"]])
    return buf.getvalue()


def model_fingerprint(path: str) -> str:
    """sha256 over the checkpoint folder's file names, sizes and modification times: a rewritten
    checkpoint at the same path is a different model for resuming."""
    import hashlib

    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(folder, f))
            h.update(f"{os.path.relpath(os.path.join(folder, f), path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _previous(done, path: str, run_settings: Dict, fingerprint: str):
    """The result of an earlier run in ``done`` when it evaluated the same files with the same settings."""
    import json

    if not done or not os.path.isfile(done):
        return None
    try:
        with open(done, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    same = (isinstance(old, dict) and old.get("settings") == run_settings and old.get("fingerprint") == fingerprint
            and old.get("model") == os.path.abspath(path) and "languages" in old)
    return old if same else None


def check_tokenizers(cfg: EvaluateConfig, paths: List[str], manifest, manifest_path: str) -> None:
    """Every model was made with the manifest's tokenizer (unless ``allow_other_tokenizer``): ids of
    another tokenizer of the same vocabulary size would be scored as other tokens, a wrong loss."""
    from megatron_mmbert.checkpoints.layout import data_tokenizer_dir, tokenizer_mismatch

    for path in paths:
        why = tokenizer_mismatch(path, manifest.tokenizer.to_json(), data_tokenizer_dir(manifest_path))
        if why is None:
            continue
        if cfg.allow_other_tokenizer:
            logger.warning(f"allow_other_tokenizer: {why}")
            continue
        raise ConfigError(f"{why}; its loss on this manifest would be meaningless. Evaluate on data made with the "
                          "model's tokenizer, or set allow_other_tokenizer to do it anyway",
                          field="allow_other_tokenizer")


def evaluate(cfg: EvaluateConfig) -> Tuple[Dict, str]:
    """Evaluate (or compare); on rank 0 write the files and return ``(result, text table)``."""
    from megatron_mmbert import runtime

    check(cfg)  # EvaluateConfig.validate: also for a config built in Python
    manifest = eval_data.load(cfg.manifest)
    sizes = eval_data.load(cfg.size_manifest, "size_manifest") if cfg.size_manifest else manifest
    manifest_path = os.path.abspath(cfg.manifest)
    languages = eval_data.resolve_languages(manifest, cfg.languages)
    paths = cfg.compare or [cfg.load or cfg.hf_dir]
    kinds = [checkpoint_kind(p) for p in paths]
    if cfg.load and kinds[0] != "megatron":
        raise ConfigError(f"load={cfg.load!r} is a Hugging Face directory: pass it as hf_dir", field="load")
    if cfg.hf_dir and kinds[0] != "hf":
        raise ConfigError(f"hf_dir={cfg.hf_dir!r} is a megatron-mmbert checkpoint: pass it as load", field="hf_dir")
    check_tokenizers(cfg, paths, manifest, manifest_path)
    out = prepare_output(cfg.out) if _is_rank0() else os.path.abspath(cfg.out)
    rows = build_rows(cfg, manifest, languages)
    size_tokens = {lang: e.tokens for lang, e in sizes.languages.items()}
    missing = [lang for lang in languages if lang not in size_tokens]
    if missing:
        raise ConfigError(f"size_manifest lacks languages {missing[:5]}; give the manifest the evaluated one "
                          "came from", field="size_manifest")
    results = {}
    names = model_names(paths)
    run_settings = settings(cfg, manifest_path)
    try:
        for name, path, kind in zip(names, paths, kinds):
            fingerprint = model_fingerprint(path)
            done = os.path.join(out, name, "eval.json") if cfg.compare else None
            previous = _previous(done, path, run_settings, fingerprint)
            if previous is not None:  # a rerun of an interrupted --compare resumes here
                if _is_rank0():
                    print(f"[{name}] reusing {done} (same model files and settings)", file=sys.stderr, flush=True)
                results[name] = previous
                continue
            scorer = open_scorer(path, kind, cfg.tp, cfg.pp, cfg.seed, cfg.verify)
            eval_data.check_vocab(manifest, scorer.vocab_size, path)
            sums = score_model(scorer, rows, cfg.quiet, name)
            scorer.close()
            result = metrics.summarize(sums, {r.language: r.rows for r in rows}, cfg.seq_len, size_tokens)
            results[name] = {"model": os.path.abspath(path), "format": kind, "fingerprint": fingerprint,
                             "settings": run_settings, **result}
            if _is_rank0():
                target = os.path.join(out, name) if cfg.compare else out
                atomic_write_json(os.path.join(target, "eval.json"), results[name])
                atomic_write_text(os.path.join(target, "eval.csv"), eval_csv(results[name]))
    finally:
        runtime.shutdown()
    if not _is_rank0():
        return {}, ""
    if not cfg.compare:
        (result,) = results.values()
        return result, metrics.format_table(result)
    table = metrics.compare(results)
    payload = {**table, "paths": {n: results[n]["model"] for n in names}, "settings": settings(cfg, manifest_path),
               "results": {n: {"mean": results[n]["mean"], "groups": results[n]["groups"]} for n in names},
               "config": to_dict(cfg)}
    atomic_write_json(os.path.join(out, "compare.json"), payload)
    atomic_write_text(os.path.join(out, "compare.csv"), compare_csv(table))
    return payload, metrics.format_compare(table)
