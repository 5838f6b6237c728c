"""Decay branches continue their parent's data.

A 3-phase parent and its decay branches declared the way the shipped ``decay_*.yaml`` are (inherit
the parent's config, edit the decay phase by name, ``init.start_phase: decay``), indexed by
``tools/build_data_index.py`` over tiny real shards: the branch's decay rows (languages, packed
document pieces, masks) equal the parent's, and every language's ``first_token`` in both
``index_plan.json`` files agrees. A branch declared the old way (its own one-phase list) starts
every stream at token 0 and is refused by the run (``test_run_refuses_*``).
"""

import json
import os

import numpy as np
import pytest
import yaml

from megatron_mmbert.cli.build_data_index import main as build_index
from megatron_mmbert.data.index import phase_end_positions
from megatron_mmbert.data.mlm import MLMStream
from megatron_mmbert.training.config import load_config
from megatron_mmbert.training.data_position import DataPosition
from tests.helpers.training import check, launch, tiny_run_config, write_manifest


def _parent(tmp_path, packing="concat"):
    manifest = write_manifest(tmp_path / "shards")
    path = tiny_run_config(str(tmp_path / "parent.yaml"), manifest, str(tmp_path / "parent"))
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["phases"][0]["languages"], cfg["phases"][1]["languages"] = "top:2", "all"  # 3 languages here
    cfg["model"]["attention_output_dropout"] = 0.0  # dropout is seeded by the step, which a branch restarts
    cfg["optimizer"] = {"name": "stable_adamw", "clip_grad": 0.0}  # as shipped; its state goes through phase_end_mid
    cfg.setdefault("data", {})["packing"] = packing
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _branch(tmp_path, name, decay_edit, parent_checkpoint=None):
    """A decay variant declared as examples/configs/decay_*.yaml declare theirs."""
    init = {"start_phase": "decay"}
    if parent_checkpoint:
        init["checkpoint"] = parent_checkpoint
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"inherit": "parent.yaml", "run_dir": str(tmp_path / name), "init": init,
                                    "phases": {"decay": decay_edit}}))
    return str(path)


def _index_folder(config, capsys):
    assert build_index(["--config", config, "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "first_token" in out and "epochs" in out  # the printed plan
    line = [l for l in out.splitlines() if l.startswith("index ready in ")][0]
    return line.split("index ready in ", 1)[1].split(" (", 1)[0]


def _stream(config):
    run = load_config(config)
    return MLMStream(run.manifest_path, run.phases, run.data_seed, cache_dir=run.index_cache_dir,
                     default_global_batch_size=run.batch.global_batch_size,
                     anneal_segments=run.data.anneal_segments, start_phase=run.start_phase_index,
                     packing=run.data.packing, bin_rows=run.packing_bin_rows())


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_branch_reads_the_parents_decay_rows(tmp_path, capsys, packing):
    parent = _parent(tmp_path, packing)
    cont = _branch(tmp_path, "decay_cont", {"languages": "all"})  # the parent's decay mix, as decay_cont.yaml
    heavy = _branch(tmp_path, "decay_heavy", {"fixed_shares": {"fra_Latn": 0.6}})  # as decay_eng.yaml
    folders = {c: _index_folder(c, capsys) for c in (parent, cont, heavy)}
    plans = {c: json.load(open(os.path.join(folders[c], "index_plan.json"))) for c in folders}
    assert len(set(folders.values())) == 3

    # first_token agrees for every language; the parent's streams had moved (a real check)
    decay = {c: plans[c]["phases"][2] for c in plans}
    assert [p["name"] for p in plans[cont]["phases"]] == ["pretrain", "mid", "decay"]
    assert not plans[cont]["phases"][0]["built"] and decay[cont]["built"]
    langs = set(plans[parent]["language_tokens"])
    assert len(langs) == 3
    for c in (cont, heavy):
        assert set(decay[c]["languages"]) == langs
        for lang in langs:
            assert decay[c]["languages"][lang]["first_token"] == decay[parent]["languages"][lang]["first_token"]
    moved = sum(decay[parent]["languages"][lang]["first_token"] for lang in langs)
    if packing == "concat":
        assert moved == 3072 + 2048  # rows x seq_len
    else:  # whole documents taken by the packer: at least the rows' real tokens
        assert plans[parent]["packing"] == "best_fit" and moved > 0
    assert phase_end_positions(plans[parent], "mid") == {lang: r["first_token"] for lang, r in decay[parent]["languages"].items()}

    # Decay-Cont: identical rows, masks included; the skipped phases are not readable
    a, b = _stream(parent), _stream(cont)
    pa, pb = a.index.phases[2], b.index.phases[2]
    for name in ("dataset_index", "dataset_sample_index", "counts", "doc_index", "doc_offsets", "sample_idx", "row_offsets",
                 "pieces", "piece_flags", "piece_offsets", "row_ptr"):
        assert np.array_equal(np.asarray(getattr(pa, name)), np.asarray(getattr(pb, name))), name
    n = a.phase_num_samples("decay")
    assert a.global_index("decay", 0) == b.global_index("decay", 0) > 0
    ba, bb = a.batch("decay", range(n)), b.batch("decay", range(n))
    for key in ("tokens", "labels", "positions", "cu_seqlens"):
        assert np.array_equal(ba[key].numpy(), bb[key].numpy()), key
    with pytest.raises(IndexError, match="before this stream's start phase"):
        b.row("mid", 0)

    # the old declaration (its own one-phase list) would re-read every stream from token 0
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"inherit": "parent.yaml", "run_dir": str(tmp_path / "old"),
                                   "phases": [load_config(parent).phases[2].__dict__ | {"tokens": 2048}],
                                   "schedule": {"total_tokens": 2048}}))
    plan_old = json.load(open(os.path.join(_index_folder(str(old), capsys), "index_plan.json")))
    assert all(r["first_token"] == 0 for r in plan_old["phases"][0]["languages"].values())


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_run_checks_the_branch_against_the_parent_checkpoint(tmp_path, packing):
    """The parent trains its three phases; a branch declared as the shipped configs continues from
    phase_end_mid (checked), a one-phase branch is refused by --validate and by the run."""
    parent = _parent(tmp_path, packing)
    check(launch(parent, "--checkpoint.every_steps", "0", "--logging.eval_interval", "0"))
    mid = str(tmp_path / "parent" / "checkpoints" / "phase_end_mid")
    meta = json.load(open(os.path.join(mid, "mmbert_config.json")))
    record = meta["train_state"]["data_position"]
    assert record["phase"] == "mid" and record["at_phase_end"]
    assert DataPosition.from_dict(record, mid).to_dict() == record  # the typed reader reads what the run wrote
    moved = sum(record["stream_positions"].values())
    assert moved == 3072 + 2048 if packing == "concat" else moved > 0  # best_fit: the documents taken

    cont = _branch(tmp_path, "decay_cont", {"languages": "all"}, mid)
    p = check(launch(cont, "--checkpoint.every_steps", "0"))
    assert "branch check: phase 'decay' continues" in p.stdout + p.stderr
    # the branch's decay equals the parent's decay step for step (same rows, masks, weights, optimizer)
    losses = [[r["loss"] for r in map(json.loads, open(os.path.join(tmp_path, run, "metrics.jsonl")))
               if r.get("kind") == "train" and r["phase"] == "decay"] for run in ("parent", "decay_cont")]
    assert losses[0] == losses[1] and len(losses[0]) > 0

    old = tmp_path / "old.yaml"
    decay = load_config(parent).phases[2].__dict__ | {"tokens": 2048}
    old.write_text(yaml.safe_dump({"inherit": "parent.yaml", "run_dir": str(tmp_path / "old"), "phases": [decay],
                                   "schedule": {"total_tokens": 2048}, "batch": {"rampup_start_rows": None},
                                   "init": {"checkpoint": mid}}))
    v = launch(str(old), "--validate")
    assert v.returncode != 0 and "would re-read the data from its start" in v.stderr
    # a branch starting at decay from the end of pre-training would skip mid-training's data
    r = launch(cont, "--run_dir", str(tmp_path / "wrong"), "--init.checkpoint",
               str(tmp_path / "parent" / "checkpoints" / "phase_end_pretrain"))
    assert r.returncode != 0 and "does not continue the data of init.checkpoint" in r.stderr


def test_branch_continues_per_source_streams(tmp_path, capsys):
    """mid and decay read their own (HQ) manifest: a decay branch continues those streams where the
    parent's mid left them, and reads the parent's decay rows."""
    parent = _parent(tmp_path)
    hq = write_manifest(tmp_path / "hq")
    with open(parent) as f:
        cfg = yaml.safe_load(f)
    cfg["phases"][1]["manifest"] = cfg["phases"][2]["manifest"] = hq
    with open(parent, "w") as f:
        yaml.safe_dump(cfg, f)
    cont = _branch(tmp_path, "decay_cont", {"languages": "all"})
    plans = {c: json.load(open(os.path.join(_index_folder(c, capsys), "index_plan.json"))) for c in (parent, cont)}
    hq_streams = [lang for lang in plans[parent]["language_tokens"] if lang.startswith("hq~")]
    assert len(hq_streams) == 3 and plans[parent]["sources_sha256"] == plans[cont]["sources_sha256"]
    mid, decay = plans[parent]["phases"][1]["languages"], plans[cont]["phases"][2]["languages"]
    assert set(mid) == set(decay) == set(plans[parent]["language_tokens"])
    for lang in hq_streams:  # mid moved the HQ streams; the branch's decay starts where they stopped
        assert decay[lang]["first_token"] == mid[lang]["first_token"] + mid[lang]["tokens"]
    assert sum(mid[lang]["tokens"] for lang in hq_streams) == 2048 and all(
        mid[lang]["tokens"] == 0 for lang in mid if lang not in hq_streams)
    a, b = _stream(parent), _stream(cont)
    n = a.phase_num_samples("decay")
    ba, bb = a.batch("decay", range(n)), b.batch("decay", range(n))
    for key in ("tokens", "labels", "positions", "cu_seqlens"):
        assert np.array_equal(ba[key].numpy(), bb[key].numpy()), key


# -- the typed data position and the branch check (training/data_position.py) --------------------------

# A checkpoint's train_state.data_position exactly as the trainer wrote it before it was typed
# (a phase_end_mid of the tiny parent, per-source streams included): the JSON must stay byte for byte.
RECORDED = ('{"phase": "mid", "consumed_samples": 2, "phase_samples": 2, "at_phase_end": true, "data_seed": 1234, '
            '"manifest_sha256": "9f2c", "sources_sha256": {"hq~3e1f": "77ab"}, '
            '"stream_positions": {"deu_Latn": 1024, "fra_Latn": 3072, "hq~3e1f/eng_Latn": 1024}}')


def test_data_position_record_round_trips_byte_for_byte():
    position = DataPosition.from_dict(json.loads(RECORDED), "ckpt")
    assert position.stream_positions["fra_Latn"] == 3072 and position.at_phase_end
    assert json.dumps(position.to_dict()) == RECORDED
    old = json.loads(RECORDED)
    del old["sources_sha256"]  # records written before phases had their own manifests
    assert DataPosition.from_dict(old, "ckpt").sources_sha256 == {}
    assert DataPosition.of_train_state({"data_position": {}}, "ckpt") is None  # no record: None
    assert DataPosition.of_train_state(None, "ckpt") is None


@pytest.mark.parametrize("edit, says", [
    (lambda r: r.pop("stream_positions"), "lacks 'stream_positions'"),
    (lambda r: r.update(consumed_samples="2"), "field 'consumed_samples' is '2', not an integer"),
    (lambda r: r.update(data_seed=True), "field 'data_seed' is True, not an integer"),
    (lambda r: r.update(at_phase_end=1), "field 'at_phase_end' is 1, not true or false"),
    (lambda r: r["stream_positions"].update(fra_Latn=-5), "field 'stream_positions'"),
    (lambda r: r.update(sources_sha256=["77ab"]), "not a mapping of source ids to digests"),
])
def test_a_malformed_data_position_names_the_checkpoint(tmp_path, edit, says):
    from megatron_mmbert.checkpoints.layout import CheckpointError

    record = json.loads(RECORDED)
    edit(record)
    with pytest.raises(CheckpointError, match="damaged or was edited") as e:
        DataPosition.of_train_state({"data_position": record}, str(tmp_path / "phase_end_mid"))
    assert str(tmp_path / "phase_end_mid" / "mmbert_config.json") in str(e.value) and says in str(e.value)
    with pytest.raises(CheckpointError, match="is a list, not a mapping"):
        DataPosition.from_dict([record], "ckpt")


def test_branch_check_against_the_parents_recorded_position(tmp_path, capsys):
    """The position a parent's checkpoints record, from its real index plan, against a branch
    declared as the shipped decay_*.yaml (its own real plan): continues from phase_end_mid; refused
    from phase_end_pretrain, from the middle of mid, without a record, with another data seed."""
    import dataclasses

    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.data.index import IndexPlan
    from megatron_mmbert.training.data_position import check_branch, position_in_plan

    parent = _parent(tmp_path)
    cont = _branch(tmp_path, "decay_cont", {"languages": "all"}, str(tmp_path / "parent/checkpoints/phase_end_mid"))
    plans = {c: IndexPlan.read(_index_folder(c, capsys)) for c in (parent, cont)}
    mid = plans[parent].phases[1]
    end_mid = position_in_plan(plans[parent], 1, mid.samples)
    # the record the trainer always wrote, key for key
    assert list(end_mid.to_dict()) == ["phase", "consumed_samples", "phase_samples", "at_phase_end", "data_seed",
                                       "manifest_sha256", "sources_sha256", "stream_positions"]
    assert end_mid.to_dict() == {
        "phase": "mid", "consumed_samples": mid.samples, "phase_samples": mid.samples, "at_phase_end": True,
        "data_seed": plans[parent].seed, "manifest_sha256": plans[parent].manifest_sha256, "sources_sha256": {},
        "stream_positions": {k: t for k, t in phase_end_positions(plans[parent], "mid").items() if t}}
    assert sum(end_mid.stream_positions.values()) == 3072 + 2048

    run = load_config(cont)
    said = check_branch(end_mid, run, plans[cont])
    assert said.startswith("branch check: phase 'decay' continues") and "3 language streams" in said
    end_pretrain = position_in_plan(plans[parent], 0, plans[parent].phases[0].samples)
    with pytest.raises(ConfigError, match="does not continue the data of init.checkpoint.*language stream"):
        check_branch(end_pretrain, run, plans[cont])
    with pytest.raises(ConfigError, match=f"1 of {mid.samples} samples into phase 'mid'"):
        check_branch(position_in_plan(plans[parent], 1, 1), run, plans[cont])
    with pytest.raises(ConfigError, match="records no data position"):
        check_branch(None, run, plans[cont])
    with pytest.raises(ConfigError, match="data seed"):
        check_branch(dataclasses.replace(end_mid, data_seed=end_mid.data_seed + 1), run, plans[cont])
    restart = dataclasses.replace(run, init=dataclasses.replace(run.init, restart_data=True))
    assert check_branch(end_pretrain, restart, plans[cont]).startswith("init.restart_data")
