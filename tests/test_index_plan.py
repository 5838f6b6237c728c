"""The typed index plan (data/index/plan.py): ``index_plan.json`` read into dataclasses and written back
byte for byte, its accessors agreeing with the arrays, and a clear error naming the file and the field
for a file that is not a plan."""

import json
import os

import pytest

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.data.index import IndexPlan, IndexPlanError, build_data_index, format_index_plan, write_index_plan
from megatron_mmbert.data.shards import load_manifest
from tests.helpers.corpus import write_corpus

PHASES = [
    PhaseConfig(name="p", tokens=64 * 40, seq_len=64, temperature=0.5),
    PhaseConfig(name="q", tokens=128 * 12, seq_len=128, temperature=0.3, languages=["l0", "l2"]),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Cached indexes of a tiny corpus: concat, best_fit in packed rows of 2 / 4 rows, a branch."""
    tmp = tmp_path_factory.mktemp("plan")
    path, _ = write_corpus(str(tmp / "corpus"), [40, 15, 6, 0], max_len=150)
    manifest, cache = load_manifest(path), str(tmp / "cache")
    return {
        "concat": build_data_index(manifest, PHASES, seed=3, cache_dir=cache),
        "best_fit": build_data_index(manifest, PHASES, seed=3, cache_dir=cache, packing="best_fit", bin_rows=[2, 4]),
        "branch": build_data_index(manifest, PHASES, seed=3, cache_dir=cache, start_phase=1),
    }


@pytest.mark.parametrize("name", ["concat", "best_fit", "branch"])
def test_plan_read_typed_and_written_again_is_the_same_file(built, tmp_path, name):
    index = built[name]
    plan = IndexPlan.read(index.path)
    assert plan == index.typed_plan == IndexPlan.read(os.path.join(index.path, "index_plan.json"))
    assert plan.to_json() == index.plan
    again = plan.write(str(tmp_path))
    assert open(again, "rb").read() == open(os.path.join(index.path, "index_plan.json"), "rb").read()
    assert format_index_plan(plan) == format_index_plan(index.plan)

    # The accessors are the arrays' numbers.
    assert plan.seed == 3 and plan.packing == index.phases[0].packing and len(plan.manifest_sha256) == 64
    assert plan.start_phase == ("q" if name == "branch" else "p") and plan.sources_sha256 == {}
    for k, (p, arrays) in enumerate(zip(plan.phases, index.phases)):
        assert (p.index, p.name, p.built) == (k, PHASES[k].name, arrays.built)
        assert p.samples == (len(arrays.dataset_index) if p.built else int(arrays.counts.sum()))
        for i, lang in enumerate(index.languages):
            if lang in p.languages:
                assert p.languages[lang].rows == int(arrays.counts[i])
                assert p.languages[lang].first_token == int(arrays.first_token[i])
        assert plan.phase(p.name) is p
    assert plan.phase_end_positions("p") == plan.phases[1].first_tokens()
    assert "l3" not in plan.language_tokens  # no tokens: not in the plan
    q = plan.phase("q").packing
    assert q.mode == plan.packing and (q.rows_per_packed_row == 4) == (name == "best_fit")
    assert (q.dropped_tokens is not None) == (name == "best_fit") and q.segments > 0
    if name == "branch":
        assert plan.phase("p").packing.pad_fraction is None and plan.phase("p").packing.segments is None
    with pytest.raises(KeyError, match=r"'decay' is not in the index plan \(\['p', 'q'\]\)"):
        plan.phase("decay")


def _broken(plan_json, edit):
    data = json.loads(json.dumps(plan_json))
    edit(data)
    return data


BROKEN = [
    (lambda d: d.pop("seed"), r"seed is missing"),
    (lambda d: d.update(seed="3"), r"seed must be int, got str '3'"),
    (lambda d: d.update(seed=True), r"seed must be int, got bool"),
    (lambda d: d.update(extra=1), r"extra is not a field of an index plan"),
    (lambda d: d.update(phases={}), r"phases must be list"),
    (lambda d: d["phases"][1].pop("samples"), r"phases\.1\.samples is missing"),
    (lambda d: d["phases"][0]["languages"]["l0"].update(rows=1.5), r"phases\.0\.languages\.l0\.rows must be int"),
    (lambda d: d["phases"][0]["languages"].update(zz={"rows": 1, "tokens": 1, "first_token": 0, "epochs": 0.1}),
     r"phases\.0\.languages\.zz has no language_tokens entry"),
    (lambda d: d["phases"][0]["packing"].update(mode="greedy"), r"phases\.0\.packing\.mode must be one of"),
    (lambda d: d["phases"][0]["packing"].update(eos_end_fraction=0.5), r"eos_end_fraction is a best_fit field"),
    (lambda d: d["phases"][0]["packing"].update(pad_fraction="none"), r"pad_fraction must be null or float"),
    (lambda d: d["language_tokens"].update(l0=None), r"language_tokens\.l0 must be int"),
]


@pytest.mark.parametrize("edit,message", BROKEN)
def test_a_malformed_plan_is_refused_naming_the_file_and_field(built, tmp_path, edit, message):
    write_index_plan(_broken(built["concat"].plan, edit), str(tmp_path))
    with pytest.raises(IndexPlanError, match=message) as e:
        IndexPlan.read(str(tmp_path))
    assert str(tmp_path / "index_plan.json") in str(e.value)


def test_a_file_that_is_not_a_plan_is_refused(tmp_path):
    path = tmp_path / "index_plan.json"
    path.write_text("{not json")
    with pytest.raises(IndexPlanError, match="index_plan.json: not JSON"):
        IndexPlan.read(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(IndexPlanError, match="must be a JSON object, got list"):
        IndexPlan.read(str(tmp_path))
    assert issubclass(IndexPlanError, ValueError)
