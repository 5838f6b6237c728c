"""The Hugging Face Hub, in and out: Hub ids wherever a path is taken, and pushing an export.

In: :func:`resolve` turns ``org/name`` or ``org/name@revision`` (a string that is not an existing
path) into a local snapshot folder with ``huggingface_hub.snapshot_download``, which honours
``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE=1`` (use the cache only) and
``HF_TOKEN`` (private and gated repos). An existing path always wins, so a local folder that happens
to be called ``org/name`` is used as it is.

Out: :func:`push_to_hub` uploads an ``export-hf`` folder with a generated model card
(:func:`model_card`): the architecture and sizes from ``config.json``, the languages and tokens per
phase from the run when the export came from a training checkpoint of a run folder, and the merge
report when the checkpoint is a TIES merge.

``huggingface_hub`` is an optional dependency: ``pip install 'megatron-mmbert[hub]'``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from megatron_mmbert.checkpoints.layout import HF_CONFIG, MERGE_REPORT
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.fileio import OUTPUT_MARKER, atomic_write_text, record_output_file

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[A-Za-z0-9_./-]+))?$")
"""``org/name`` or ``org/name@revision`` (a branch, tag or commit sha), as the Hub spells repo ids."""

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md"]
"""What is downloaded for a model: configs, safetensors weights, tokenizer files. Never
``*.bin`` / ``*.pt`` (pickles: loading them from a stranger's repo runs their code)."""


class HubError(ConfigError):
    """A Hub id could not be resolved (offline and not cached, no access, no such repo/revision)."""


MAX_REPO_ID = 96
"""The Hub's longest repo id (``org/name``), as ``huggingface_hub.utils.validate_repo_id`` enforces it."""


def check_repo_id(repo: str, field: str = "push_to_hub") -> None:
    """Refuse a repo id the Hub would refuse (a malformed one, a revision in it, over 96 characters),
    before anything is exported or uploaded."""
    if not HUB_ID.match(repo) or "@" in repo:
        raise HubError(f"{field}={repo!r}: expected a repo id like org/name (the branch goes in revision)",
                       field=field)
    if len(repo) > MAX_REPO_ID:
        raise HubError(f"{field}={repo[:48]!r}... is {len(repo)} characters; the Hub allows at most {MAX_REPO_ID} "
                       "for org/name: choose a shorter name", field=field)


def is_hub_id(text: str) -> bool:
    """True when ``text`` looks like ``org/name[@revision]`` and is not an existing path."""
    return isinstance(text, str) and not os.path.exists(text) and HUB_ID.match(text) is not None


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(
            "Hub ids and push_to_hub need huggingface_hub: pip install 'megatron-mmbert[hub]' "
            "(or pass a local folder)"
        ) from None
    return huggingface_hub


def resolve(path_or_id: str, allow_patterns: Optional[Sequence[str]] = None, what: str = "model") -> str:
    """A local path for ``path_or_id``: an existing path as it is; ``org/name[@revision]`` as the
    folder of its Hub snapshot (downloaded, or from the cache); anything else unchanged, so the
    caller's own "does not exist" error names it.

    ``allow_patterns``: the files to fetch (default :data:`MODEL_FILES`)."""
    if not is_hub_id(path_or_id):
        return path_or_id
    match = HUB_ID.match(path_or_id)
    repo, revision = match["repo"], match["revision"]
    if len(repo) > MAX_REPO_ID:
        raise HubError(f"{what} {path_or_id[:48]!r}... is not a local path, and as a Hub repo id it has {len(repo)} "
                       f"characters (the Hub allows at most {MAX_REPO_ID}); check the path")
    hub = _hub()
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return hub.snapshot_download(repo, revision=revision,
                                     allow_patterns=list(allow_patterns or MODEL_FILES))
    except errors.LocalEntryNotFoundError as exc:
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub could not be reached ({exc.__class__.__name__})"
        raise HubError(
            f"{what} {path_or_id!r} is not a local path and not in the Hub cache {cache}, and {why}. "
            f"Fix: download it where the Hub is reachable (`hf download {repo}"
            f"{' --revision ' + revision if revision else ''}` with the same HF_HOME), or unset HF_HUB_OFFLINE, "
            "or pass a local folder"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{what} {path_or_id!r}: the Hub repo {repo} has no revision {revision!r}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as exc:
        raise HubError(
            f"{what} {path_or_id!r} is not a local path, and the Hub repo {repo} does not exist or needs "
            f"access ({exc.__class__.__name__}); check the id, or set HF_TOKEN to a token that can read it"
        ) from None


# -- out: the model card and the upload -------------------------------------------------------------

def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _source_of(folder: str) -> Optional[str]:
    """The checkpoint an ``export-hf`` folder was written from (its output marker records it)."""
    from megatron_mmbert.fileio import OUTPUT_MARKER

    marker = _read_json(os.path.join(folder, OUTPUT_MARKER))
    source = marker.get("source") if isinstance(marker, dict) else None
    return source if isinstance(source, str) and os.path.isdir(source) else None


def _run_config(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The resolved run config of a training checkpoint in ``RUN/checkpoints/NAME``
    (``RUN/resolved_config.yaml``)."""
    import yaml

    from megatron_mmbert.checkpoints.layout import resolved_config_path
    from megatron_mmbert.config_base import safe_load_yaml

    path = resolved_config_path(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), existing=True)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_yaml(f, path)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _phase_languages(phase: Dict[str, Any], run: Optional[Dict[str, Any]]) -> Optional[List[str]]:
    """A phase's languages: its list, or ``all`` / ``top:N`` read from the run's manifest (by tokens)."""
    spec = phase.get("languages")
    if isinstance(spec, list):
        return [str(lang) for lang in spec]
    path = ((run or {}).get("data") or {}).get("manifest")
    if not isinstance(spec, str) or not isinstance(path, str):
        return None
    manifest = _read_json(os.path.join(path, "manifest.json") if os.path.isdir(path) else path)
    entries = (manifest or {}).get("languages")
    if not isinstance(entries, dict):
        return None
    ranked = sorted((lang for lang, e in entries.items() if isinstance(e, dict) and e.get("tokens", 0) > 0),
                    key=lambda lang: (-entries[lang]["tokens"], lang))
    if spec == "all":
        return ranked
    if spec.startswith("top:") and spec[4:].isdigit():
        return ranked[: int(spec[4:])]
    return None


def _tokens(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _checkpoint_config(directory: str) -> Optional[dict]:
    """The checkpoint's own config (model, training position), or None where it has none."""
    from megatron_mmbert.checkpoints.layout import CheckpointError, read_config_if_any

    try:
        return read_config_if_any(directory)
    except CheckpointError:
        return None


def model_card(folder: str, source: Optional[str] = None, repo: Optional[str] = None) -> str:
    """README.md text for the HF folder ``folder``; ``source``: the checkpoint it was exported from
    (default: the one its export marker records)."""
    config = _read_json(os.path.join(folder, HF_CONFIG)) or {}
    source = source or _source_of(folder)
    meta = _checkpoint_config(source) if source else None
    train_state = (meta or {}).get("train_state") or {}
    run = _run_config(source) if source and train_state else None
    merge = _read_json(os.path.join(source, MERGE_REPORT)) if source else None

    weights = os.path.join(folder, "model.safetensors")
    params = None
    if os.path.isfile(weights):
        from safetensors import safe_open

        with safe_open(weights, "pt") as f:
            params = 0
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                params += n

    phase_langs = {p.get("name"): _phase_languages(p, run) for p in (run or {}).get("phases") or []}
    languages = sorted({lang for langs in phase_langs.values() if langs for lang in langs})
    lines = ["---", "library_name: transformers", "pipeline_tag: fill-mask", "tags:", "- modernbert",
             "- mmbert", "- megatron-mmbert"]
    if languages:
        lines += ["language:"] + [f"- {code}" for code in sorted({lang.split("_")[0] for lang in languages})]
    lines += ["---", "", f"# {repo or os.path.basename(os.path.abspath(folder))}", "",
              "A ModernBERT-architecture masked language model (the mmBERT recipe, arXiv:2509.06888) "
              "pre-trained with megatron-mmbert and exported with `mmbert-convert export-hf`.", "",
              "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer",
              f'tokenizer = AutoTokenizer.from_pretrained("{repo or "PATH"}")',
              f'model = AutoModelForMaskedLM.from_pretrained("{repo or "PATH"}")', "```", "",
              "## Architecture", "", "| | |", "|---|---|"]
    rows = [("architecture", ", ".join(config.get("architectures") or ["?"])),
            ("parameters", f"{params / 1e6:.1f}M" if params is not None else "?")]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "local_attention", "global_attn_every_n_layers",
                "global_rope_theta", "local_rope_theta"):
        if key in config:
            rows.append((key, config[key]))
    lines += [f"| {k} | {v} |" for k, v in rows]
    if train_state:
        lines += ["", "## Training", "",
                  f"Exported from step {train_state.get('step', '?')} (phase `{train_state.get('phase', '?')}`, "
                  f"{_tokens(train_state.get('tokens'))} tokens seen).", ""]
        phases = (run or {}).get("phases") or []
        if phases:
            lines += ["| phase | tokens | seq_len | mask rate | languages |", "|---|---|---|---|---|"]
            for p in phases:
                known = phase_langs.get(p.get("name"))
                langs = str(len(known)) if known else str(p.get("languages"))
                lines.append(f"| {p.get('name')} | {_tokens(p.get('tokens'))} | {p.get('seq_len')} | "
                             f"{p.get('mask_rate')} | {langs} |")
        else:
            lines.append("The run's config was not found beside the checkpoint, so the phases are not listed.")
    if merge:
        spec = merge.get("spec") or {}
        lines += ["", "## Merge", "",
                  f"A TIES merge of {len(merge.get('models') or [])} models over base `{merge.get('base')}` "
                  f"(weights {merge.get('weights')}, density {spec.get('density')}).", "",
                  "```json", json.dumps({k: merge[k] for k in ("base", "models", "weights", "spec") if k in merge},
                                        indent=1), "```"]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: str, repo: str, private: bool = False, revision: Optional[str] = None,
                source: Optional[str] = None) -> str:
    """Write ``folder/README.md`` (unless the folder has one) and upload ``folder`` to the Hub model
    repo ``repo`` (created if missing; ``revision``: a branch, created if missing). Returns the URL."""
    check_repo_id(repo)
    if not os.path.isfile(os.path.join(folder, HF_CONFIG)):
        raise HubError(f"{folder} has no {HF_CONFIG}; push the folder `export-hf` wrote")
    hub = _hub()
    card = os.path.join(folder, "README.md")
    if not os.path.exists(card):
        atomic_write_text(card, model_card(folder, source, repo))
        record_output_file(folder, "README.md")  # ours: a later overwrite may replace it
    api = hub.HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        # the output marker records local paths: it stays here
        info = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                                 ignore_patterns=[".*", "*.tmp-*", OUTPUT_MARKER],
                                 commit_message="Upload megatron-mmbert export")
    except Exception as exc:  # noqa: BLE001 - no network, refused token, Hub errors: one line, the export kept
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise HubError(
            f"could not upload {folder} to the Hub repo {repo} ({exc.__class__.__name__}: {first}). The export in "
            f"{folder} is complete and kept; push it later (`hf upload {repo} {folder}`, with HF_TOKEN set) or rerun "
            "export-hf with push_to_hub where the Hub is reachable", field="push_to_hub") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"


__all__: List[str] = ["HUB_ID", "MAX_REPO_ID", "check_repo_id", "HubError", "is_hub_id", "resolve", "model_card", "push_to_hub"]
