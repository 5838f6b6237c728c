"""The evaluation math: MLM sums from logits, per-language results, means, resource groups, and
the side-by-side comparison. Every model source (megatron at any layout, HF) goes through
:func:`mlm_sums`, so their numbers are comparable by construction."""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from megatron_mmbert.data.mlm import IGNORE_INDEX

GROUP_NAMES = ("high", "mid", "low")


def mlm_sums(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float64 ``[loss sum, masked tokens, correct]`` of logits ``[..., V]`` against ``labels``
    (``-100`` where not predicted). Logits past ``vocab_size`` (TP padding) are dropped; the
    log-softmax is taken in float64 so that layouts and frameworks agree to rounding."""
    selected = labels.reshape(-1) != IGNORE_INDEX
    target = labels.reshape(-1)[selected].long()
    scores = logits.reshape(-1, logits.shape[-1])[selected][:, :vocab_size].double()
    if target.numel() == 0:
        return torch.zeros(3, dtype=torch.float64)
    logp = torch.log_softmax(scores, dim=-1)
    loss = -logp.gather(1, target[:, None]).sum()
    correct = (scores.argmax(dim=-1) == target).sum()
    return torch.stack([loss, torch.tensor(float(target.numel()), dtype=torch.float64), correct.double()])


def resource_groups(languages: Sequence[str], tokens: Mapping[str, int]) -> Dict[str, List[str]]:
    """Terciles by manifest tokens: the largest third ``high``, then ``mid``, ``low`` (ties by name;
    groups of ``ceil(n / 3)``, as training's evaluation groups)."""
    ranked = sorted(languages, key=lambda lang: (-int(tokens.get(lang, 0)), lang))
    k = max(1, math.ceil(len(ranked) / 3))
    groups = {name: ranked[i * k:(i + 1) * k] for i, name in enumerate(GROUP_NAMES)}
    return {g: v for g, v in groups.items() if v}


def capped_groups(groups: Mapping[str, Sequence[str]], per_group: int) -> Dict[str, List[str]]:
    """At most ``per_group`` languages of each :func:`resource_groups` group, the ones that speak for
    it: the largest of ``high``, those around the median of ``mid``, the smallest of ``low`` (so with
    20, the 20 largest and the 20 smallest languages). ``per_group`` 0 keeps every language."""
    out = {}
    for g, members in groups.items():
        members = list(members)
        if per_group and len(members) > per_group:
            if g == "high":
                members = members[:per_group]
            elif g == "low":
                members = members[-per_group:]
            else:
                start = (len(members) - per_group) // 2
                members = members[start:start + per_group]
        out[g] = members
    return out


def _mean(per_language: Mapping[str, Dict], names: Sequence[str]) -> Dict[str, float]:
    """Token-weighted (all masked tokens pooled) and macro (each language counts once) means."""
    rows = [per_language[n] for n in names]
    masked = sum(r["masked_tokens"] for r in rows)
    return {
        "loss": sum(r["loss_sum"] for r in rows) / max(masked, 1),
        "accuracy": sum(r["correct"] for r in rows) / max(masked, 1),
        "macro_loss": sum(r["loss"] for r in rows) / max(len(rows), 1),
        "macro_accuracy": sum(r["accuracy"] for r in rows) / max(len(rows), 1),
        "masked_tokens": int(masked),
        "languages": len(rows),
    }


def summarize(sums: Mapping[str, torch.Tensor], rows: Mapping[str, int], seq_len: int,
              size_tokens: Mapping[str, int], groups: Optional[Mapping[str, Sequence[str]]] = None) -> Dict:
    """``eval.json``'s body from per-language :func:`mlm_sums` totals.

    ``languages``: per language ``loss``, ``accuracy``, ``masked_tokens`` (plus ``rows``, ``tokens``
    and the raw ``loss_sum`` / ``correct``); ``mean``: token-weighted ``loss`` / ``accuracy`` and
    language-macro ``macro_loss`` / ``macro_accuracy``; ``groups``: the same means per resource
    tercile (by ``size_tokens``) with the languages in it, or per given ``groups`` (their members
    that were evaluated; training passes the terciles of a phase's languages, capped)."""
    per = {}
    for lang, s in sums.items():
        loss_sum, count, correct = (float(x) for x in s.tolist())
        per[lang] = {
            "loss": loss_sum / count if count else float("nan"),
            "accuracy": correct / count if count else float("nan"),
            "masked_tokens": int(count),
            "rows": int(rows[lang]),
            "tokens": int(rows[lang]) * int(seq_len),
            "loss_sum": loss_sum,
            "correct": int(correct),
        }
    names = list(per)
    chosen = resource_groups(names, size_tokens) if groups is None else groups
    result_groups = {}
    for g, members in chosen.items():
        members = [m for m in members if m in per]
        if members:
            result_groups[g] = {**_mean(per, members), "members": members}
    return {"languages": per, "mean": _mean(per, names), "groups": result_groups}


def compare(results: Mapping[str, Dict]) -> Dict:
    """Side by side: per language each model's loss / accuracy and the ``winner`` (lowest loss;
    the first listed on a tie), and the same for the means and groups; ``groups``: each resource
    group's languages."""
    names = list(results)
    first = results[names[0]]
    table = {}

    def row(values: Dict[str, Dict]) -> Dict:
        winner = min(names, key=lambda n: (values[n]["loss"], names.index(n)))
        return {"loss": {n: values[n]["loss"] for n in names},
                "accuracy": {n: values[n]["accuracy"] for n in names}, "winner": winner}

    for lang in first["languages"]:
        table[lang] = row({n: results[n]["languages"][lang] for n in names})
    means = {"mean": row({n: results[n]["mean"] for n in names}),
             "macro": row({n: {"loss": results[n]["mean"]["macro_loss"],
                               "accuracy": results[n]["mean"]["macro_accuracy"]} for n in names})}
    for g in first["groups"]:
        means[f"group_{g}"] = row({n: results[n]["groups"][g] for n in names})
    wins = {n: sum(1 for r in table.values() if r["winner"] == n) for n in names}
    groups = {g: list(first["groups"][g].get("members", [])) for g in first["groups"]}
    return {"models": names, "languages": table, "summary": means, "wins": wins, "groups": groups}


def format_table(result: Dict) -> str:
    """``eval.json`` as a text table: languages largest group first, then means and groups."""
    lines = [f"{'language':<24} {'loss':>9} {'acc':>7} {'masked':>9}"]
    for lang, r in result["languages"].items():
        lines.append(f"{lang:<24} {r['loss']:>9.4f} {r['accuracy']:>7.4f} {r['masked_tokens']:>9,}")
    m = result["mean"]
    lines.append(f"{'mean (token-weighted)':<24} {m['loss']:>9.4f} {m['accuracy']:>7.4f} {m['masked_tokens']:>9,}")
    lines.append(f"{'mean (language macro)':<24} {m['macro_loss']:>9.4f} {m['macro_accuracy']:>7.4f}")
    for g, r in result["groups"].items():
        label = f"group {g} ({len(r['members'])})"
        lines.append(f"{label:<24} {r['loss']:>9.4f} {r['accuracy']:>7.4f} {r['masked_tokens']:>9,}")
    return "\n".join(lines)


def format_compare(table: Dict) -> str:
    """:func:`compare` as text: one loss column per model and the winner."""
    names = table["models"]
    width = max(10, *(len(n) for n in names))
    head = f"{'language':<24} " + " ".join(f"{n:>{width}}" for n in names) + "  winner"
    lines = [head]
    for lang, r in list(table["languages"].items()) + list(table["summary"].items()):
        lines.append(f"{lang:<24} " + " ".join(f"{r['loss'][n]:>{width}.4f}" for n in names) + f"  {r['winner']}")
    lines.append("languages won: " + ", ".join(f"{n} {table['wins'][n]}" for n in names))
    return "\n".join(lines)
