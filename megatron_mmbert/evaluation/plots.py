"""Pictures of a run, drawn with matplotlib (optional extra ``plots``), each written as a PNG next
to the data it shows:

* :func:`plot_schedule` -- ``index_plan.json`` (``data.index.index_plan``): per phase each
  language's share of the phase's rows (log scale) and the epochs seen of it (within the phase and
  cumulative by its end, ``data.index.phase_epochs``);
* :func:`plot_loss` -- a run's ``metrics.jsonl`` (``training.logging``): training loss per step,
  evaluation losses where logged, phase boundaries marked;
* :func:`plot_compare` -- ``compare.json`` of ``tools/evaluate.py --compare``: each model's
  per-language loss minus a baseline's, sorted, one panel per resource group, worst and best named.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.fileio import atomic_write_with


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "plots need matplotlib, an optional extra: pip install 'megatron-mmbert[plots]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _read_json(path: str, name: str) -> Tuple[Dict, str]:
    if os.path.isdir(path):
        path = os.path.join(path, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), path
    except FileNotFoundError:
        raise ConfigError(f"no {name} at {path}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None


def _save(fig, path: str) -> str:
    """Write the PNG atomically (a partial file never takes the final name)."""
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"), suffix=".png")
    return path


def _out_path(data_path: str, out: Optional[str], default: str) -> str:
    return out or os.path.join(os.path.dirname(os.path.abspath(data_path)), default)


def plot_schedule(plan_path: str, out: Optional[str] = None, max_languages: int = 60) -> str:
    """Share (log) and epochs per language for every phase of an index plan; returns the PNG path.
    Languages are ordered by manifest size; beyond ``max_languages`` every k-th is shown."""
    from megatron_mmbert.data.index import IndexPlan, IndexPlanError, phase_epochs

    plt = _pyplot()
    plan, plan_path = _read_json(plan_path, "index_plan.json")
    try:
        IndexPlan.from_json(plan, plan_path)  # a file that is not a plan: an error naming the field
    except IndexPlanError as e:
        raise ConfigError(str(e)) from None
    sizes = plan["language_tokens"]
    order = sorted(sizes, key=lambda lang: (-sizes[lang], lang))
    if len(order) > max_languages:
        step = -(-len(order) // max_languages)
        order = order[::step]
    phases = plan["phases"]
    fig, axes = plt.subplots(2, len(phases), figsize=(max(6, 4.5 * len(phases)), 8), squeeze=False,
                             sharey="row")
    x = list(range(len(order)))
    smallest = 1.0
    for k, phase in enumerate(phases):
        rows = {lang: r["rows"] for lang, r in phase["languages"].items()}
        total = max(sum(rows.values()), 1)
        share = [rows.get(lang, 0) / total for lang in order]
        ax = axes[0][k]
        # Markers, not bars: on a log axis a bar's height depends on where the axis starts.
        ax.plot(x, [s if s > 0 else float("nan") for s in share], "o-", color="tab:blue", ms=4)
        ax.set_yscale("log")
        smallest = min([smallest] + [s for s in share if s > 0])
        ax.set_title(f"{phase['name']}: {phase['samples']:,} rows x {phase['seq_len']}")
        ax.set_ylabel("share of rows" if k == 0 else "")
        epochs = phase_epochs(plan, phase["name"])
        ax = axes[1][k]
        ax.bar(x, [epochs.get(lang, {}).get("in_phase", 0.0) for lang in order], color="tab:orange",
               label="within phase")
        ax.plot(x, [phase["languages"].get(lang, {}).get("epochs", 0.0) for lang in order], "k.",
                label="cumulative by its end")
        ax.set_ylabel("epochs" if k == 0 else "")
        ax.legend(fontsize=7)
        for a in (axes[0][k], axes[1][k]):
            a.set_xticks(x)
            a.set_xticklabels(order, rotation=90, fontsize=6 if len(order) > 20 else 8)
    axes[0][0].set_ylim(smallest / 2, 1.0)
    fig.suptitle("sampling schedule (languages by size, largest first; no marker: not drawn in the phase)")
    fig.tight_layout()
    path = _save(fig, _out_path(plan_path, out, "schedule.png"))
    plt.close(fig)
    return path


def read_metrics(path: str) -> Tuple[List[Dict], str]:
    """Records of ``metrics.jsonl`` (a file or its run folder); a resumed run's repeated steps keep
    the later record. Unreadable lines (a killed writer's last) are skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"no metrics.jsonl at {path}: give a run folder or its metrics.jsonl")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records, path


def plot_loss(metrics_path: str, out: Optional[str] = None) -> str:
    """Training loss per step with phase boundaries (and evaluation losses if logged)."""
    plt = _pyplot()
    records, metrics_path = read_metrics(metrics_path)
    train = {r["step"]: r for r in records if r.get("kind") == "train" and r.get("loss") is not None}
    if not train:
        raise ConfigError(f"{metrics_path} has no training records to plot")
    steps = sorted(train)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(steps, [train[s]["loss"] for s in steps], color="tab:blue", lw=1, label="train loss")
    evals: Dict[str, Dict[int, float]] = {}
    for r in records:
        if r.get("kind") == "eval":
            for group, value in r.get("losses", {}).items():
                evals.setdefault(group, {})[r["step"]] = value
    for group, points in sorted(evals.items()):
        xs = sorted(points)
        ax.plot(xs, [points[s] for s in xs], "o--", ms=3, lw=1, label=f"eval {group}")
    prev = None
    for s in steps:
        phase = train[s].get("phase")
        if phase != prev:
            ax.axvline(s - 0.5, color="grey", ls=":", lw=1)
            ax.text(s - 0.5, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
            prev = phase
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save(fig, _out_path(metrics_path, out, "loss.png"))
    plt.close(fig)
    return path


def _compare_tiers(table: Dict, languages: List[str]) -> List[Tuple[str, List[str]]]:
    """The resource groups of a comparison (``high``, ``mid``, ``low``: terciles by training tokens),
    each with its languages; one group of all languages when the table has none."""
    groups = table.get("groups")
    if not groups:  # compare.json of an earlier release: the groups are in each model's results
        first = next(iter(table.get("results", {}).values()), {})
        groups = {g: r.get("members", []) for g, r in first.get("groups", {}).items()}
    tiers = [(g, [lang for lang in members if lang in table["languages"]]) for g, members in (groups or {}).items()]
    rank = {"high": 0, "mid": 1, "low": 2}  # most resourced first
    tiers = sorted([(g, langs) for g, langs in tiers if langs], key=lambda t: rank.get(t[0], len(rank)))
    seen = {lang for _, langs in tiers for lang in langs}
    rest = [lang for lang in languages if lang not in seen]
    if rest:
        tiers.append(("all languages" if not tiers else "other", rest))
    return tiers


def plot_compare(compare_path: str, out: Optional[str] = None, max_languages: int = 60,
                 baseline: Optional[str] = None) -> str:
    """Each model's per-language loss minus the baseline's (default: the first model compared), one
    panel per resource group (below zero: better than the baseline). A group of at most
    ``max_languages`` languages is drawn language by language, named, sorted by the models' mean
    difference; a larger one as each model's sorted differences. Every panel gives each model's mean
    and names its worst and best language. Readable at 20 languages and
    at 1833: the figure's size does not grow with the number of languages."""
    plt = _pyplot()
    table, compare_path = _read_json(compare_path, "compare.json")
    if "models" not in table or "languages" not in table:
        raise ConfigError(f"{compare_path} is not the compare.json of a comparison by tools/evaluate.py")
    names = list(table["models"])
    baseline = names[0] if baseline is None else baseline
    if baseline not in names:
        raise ConfigError(f"baseline {baseline!r} is not a compared model; models are {names}", field="baseline")
    others = [n for n in names if n != baseline]
    if not others:
        raise ConfigError(f"{compare_path} compares one model; a comparison plot needs two", field="path")
    langs = table["languages"]
    diff = {lang: {n: r["loss"][n] - r["loss"][baseline] for n in others} for lang, r in langs.items()}
    tiers = _compare_tiers(table, list(langs))
    fig, axes = plt.subplots(1, len(tiers), figsize=(5.2 * len(tiers) + 1, 5.6), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (tier, members) in zip(axes[0], tiers):
        order = sorted(members, key=lambda lang: sum(diff[lang].values()) / len(others))
        xs = range(len(order))
        few = len(order) <= max_languages
        notes = []
        for j, name in enumerate(others):
            ys = [diff[lang][name] for lang in order]
            if not few:  # too many to name: each model's differences as a sorted curve (a quantile plot)
                ys = sorted(ys)
            ax.plot(xs, ys, marker="o" if few else None, markersize=4, linewidth=0.8 if few else 0.9,
                    alpha=1.0, color=colors[j % len(colors)], label=name)
            worst = max(order, key=lambda lang: diff[lang][name])
            best = min(order, key=lambda lang: diff[lang][name])
            mean = sum(ys) / len(ys)
            notes.append(f"{name}: mean {mean:+.3f}; worst {worst} {diff[worst][name]:+.3f}, "
                         f"best {best} {diff[best][name]:+.3f}")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{tier} resource: {len(order)} languages", fontsize=10)
        if few:
            ax.set_xticks(list(xs))
            ax.set_xticklabels(order, rotation=90, fontsize=7 if len(order) > 20 else 8)
        else:
            ax.set_xlabel(f"languages, each model's sorted by its difference ({len(order)})")
            ax.set_xticks([])
        ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", ha="left", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
        ax.grid(axis="y", alpha=0.3)
    values = [v for row in diff.values() for v in row.values()] + [0.0]
    low, high = min(values), max(values)
    span = max(high - low, 1e-3)  # the panels share it; the top leaves room for the notes
    axes[0][0].set_ylim(low - 0.05 * span, high + (0.1 + 0.075 * len(others)) * span)
    axes[0][0].set_ylabel(f"MLM loss minus {baseline}'s (below 0: better)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"per-language loss against {baseline}, by resource group", fontsize=11)
    fig.tight_layout()
    path = _save(fig, _out_path(compare_path, out, "compare.png"))
    plt.close(fig)
    return path