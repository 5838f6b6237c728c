"""Hub ids wherever a path is taken, resolved offline from a hand-built Hugging Face cache
(``HF_HOME/hub/models--org--name/snapshots/<sha>/`` + ``refs/main``, the layout huggingface_hub
writes), and the model card ``export-hf --push-to-hub`` uploads. The upload itself is
``HfApi.upload_folder``'s job and is not exercised here (no network)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers.model import make_hf_model, save_word_tokenizer
from tests.helpers.launch import ROOT, subprocess_env

pytest.importorskip("huggingface_hub")

SHA = "0123456789abcdef0123456789abcdef01234567"



@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds ``org/tiny-mlm`` at commit SHA (refs/main points at it)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--tiny-mlm"
    snapshot = repo / "snapshots" / SHA
    make_hf_model("even", str(snapshot))
    save_word_tokenizer(str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    other = home / "hub" / "models--org--tiny-mlm-b"  # a second model of the same shape, for merging
    make_hf_model("even", str(other / "snapshots" / SHA), seed=1)
    (other / "refs").mkdir(parents=True)
    (other / "refs" / "main").write_text(SHA)
    return home


def _run(hf_home, *args, code=None, cwd=None):
    env = dict(subprocess_env(), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd or ROOT)


TOKENIZE = ("import sys; from megatron_mmbert.data.tokenizer import load_tokenizer\n"
            "t = load_tokenizer(sys.argv[1]); print('IDS', t.encode_batch(['w7 w9 w300'])[0])")


@pytest.mark.slow
def test_tokenizer_hub_id_resolves_offline_from_the_cache(hf_home):
    for spec in ("org/tiny-mlm", f"org/tiny-mlm@{SHA}", "org/tiny-mlm@main"):
        p = _run(hf_home, spec, code=TOKENIZE)
        assert p.returncode == 0, p.stderr[-2000:]
        ids = json.loads(p.stdout.split("IDS", 1)[1].strip())
        assert [i for i in ids if i in (7, 9, 300)] == [7, 9, 300], ids


@pytest.mark.slow
def test_uncached_id_offline_is_a_clear_error(hf_home):
    p = _run(hf_home, "org/not-cached", code=TOKENIZE)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "org/not-cached" in err and "HF_HUB_OFFLINE" in err and "hf download org/not-cached" in err


def test_an_existing_local_path_wins_over_the_hub(hf_home, tmp_path):
    from megatron_mmbert import hub

    local = tmp_path / "org" / "tiny-mlm"
    local.mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert hub.resolve("org/tiny-mlm") == "org/tiny-mlm"  # used as it is, no Hub call
        assert not hub.is_hub_id("org/tiny-mlm") and hub.is_hub_id("org/other@v1.0")
        assert not hub.is_hub_id("just-a-name") and not hub.is_hub_id("/abs/path")
    finally:
        os.chdir(ROOT)


@pytest.mark.slow
def test_import_hf_takes_a_hub_id_offline(hf_home, tmp_path):
    out = tmp_path / "imported"
    p = _run(hf_home, "megatron_mmbert.cli.convert_checkpoint", "import-hf", "--hf-dir", "org/tiny-mlm",
             "--save", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.load(open(out / "mmbert_config.json"))
    assert meta["source"].endswith(os.path.join("snapshots", SHA))
    assert meta["model"]["num_layers"] == 4 and meta["model"]["vocab_size"] == 333
    assert os.path.isfile(out / "tokenizer" / "tokenizer.json")

    p = _run(hf_home, "megatron_mmbert.cli.convert_checkpoint", "import-hf", "--hf-dir", "org/nope",
             "--save", str(tmp_path / "x"))
    assert p.returncode == 2 and "org/nope" in p.stderr and "Traceback" not in p.stderr


def test_model_card_names_architecture_phases_and_merge(tmp_path):
    """The card of an export whose source is a training checkpoint of a run folder (RUN/resolved_config.yaml
    beside RUN/checkpoints/NAME) that is also a merge output."""
    from megatron_mmbert import hub

    export = tmp_path / "export"
    n_params = make_hf_model("even", str(export)).num_parameters()  # unique: the tied decoder counts once
    ckpt = tmp_path / "run" / "checkpoints" / "phase_end_decay"
    ckpt.mkdir(parents=True)
    (ckpt / "mmbert_config.json").write_text(json.dumps(
        {"train_state": {"step": 120, "phase": "decay", "tokens": 3_000_000_000}}))
    (ckpt / "merge_report.json").write_text(json.dumps(
        {"base": "runs/base/checkpoints/phase_end_mid", "models": ["a", "b"], "weights": [0.5, 0.5],
         "spec": {"density": 0.3}}))
    run = {"phases": [
        {"name": "pretrain", "tokens": 2_300_000_000_000, "seq_len": 1024, "mask_rate": 0.3,
         "languages": ["eng_Latn", "fra_Latn"]},
        {"name": "decay", "tokens": 100_000_000_000, "seq_len": 8192, "mask_rate": 0.05,
         "languages": ["eng_Latn", "fra_Latn", "deu_Latn"]},
        {"name": "extra", "tokens": 1_000, "seq_len": 64, "mask_rate": 0.05, "languages": "top:2"}],
        "data": {"manifest": str(tmp_path / "shards")}}
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"languages": {
        "rus_Cyrl": {"tokens": 50}, "deu_Latn": {"tokens": 90}, "ell_Grek": {"tokens": 70}, "ell_Latn": {"tokens": 60}, "amh_Ethi": {"tokens": 0}}}))
    (tmp_path / "run" / "resolved_config.yaml").write_text(yaml.safe_dump(run))

    card = hub.model_card(str(export), source=str(ckpt), repo="me/mmbert-tiny")
    assert card.startswith("---\n") and "pipeline_tag: fill-mask" in card
    header = card.split("---")[1]
    assert [l[2:] for l in header.splitlines() if l.startswith("- ") and "bert" not in l] == [
        "deu", "ell", "eng", "fra"]  # every phase's languages (top:2 of the manifest by tokens), once per code
    assert "| extra | 1K | 64 | 0.05 | 2 |" in card
    assert "# me/mmbert-tiny" in card and 'from_pretrained("me/mmbert-tiny")' in card
    assert "| num_hidden_layers | 4 |" in card and "| hidden_size | 64 |" in card
    assert f"| parameters | {n_params / 1e6:.1f}M |" in card
    assert "step 120 (phase `decay`, 3B tokens seen)" in card
    assert "| pretrain | 2.3T | 1024 | 0.3 | 2 |" in card and "| decay | 100B | 8192 | 0.05 | 3 |" in card
    assert "A TIES merge of 2 models over base `runs/base/checkpoints/phase_end_mid`" in card

    # no run beside the checkpoint and no merge: the card says what it does not know
    bare = hub.model_card(str(export))
    assert "## Training" not in bare and "## Merge" not in bare and "| num_hidden_layers | 4 |" in bare


def test_push_to_hub_refuses_bad_input_before_any_upload(tmp_path):
    from megatron_mmbert import hub

    with pytest.raises(hub.HubError, match="org/name"):
        hub.push_to_hub(str(tmp_path), "not a repo")
    with pytest.raises(hub.HubError, match="the branch goes in revision") as e:
        hub.push_to_hub(str(tmp_path), "me/model@dev")
    assert e.value.field == "push_to_hub"  # export-hf adds its flag
    with pytest.raises(hub.HubError, match="config.json"):
        hub.push_to_hub(str(tmp_path), "me/model")


@pytest.mark.slow
def test_preprocess_takes_a_hub_tokenizer_offline(hf_home, tmp_path):
    """``mmbert-preprocess --tokenizer org/name``: the shards are the tokenizer's ids of the text, and
    the manifest's tokenizer identity equals the one the cached snapshot folder gives."""
    (tmp_path / "a.jsonl").write_text('{"text": "w7 w9 w300"}\n{"text": "w11"}\n')
    out = tmp_path / "shards"
    p = _run(hf_home, "megatron_mmbert.cli.preprocess_data", "--input", str(tmp_path / "a.jsonl"), "--output",
             str(out), "--tokenizer", "org/tiny-mlm", "--lang", "xxx_Latn", "--workers", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.load(open(out / "manifest.json"))
    snapshot = hf_home / "hub" / "models--org--tiny-mlm" / "snapshots" / SHA
    local = _run(hf_home, str(snapshot), code="import sys, json; from megatron_mmbert.data.tokenizer import "
                 "load_tokenizer; print('ID', json.dumps(load_tokenizer(sys.argv[1]).identity.to_json()))")
    assert local.returncode == 0, local.stderr[-2000:]
    assert manifest["tokenizer"] == json.loads(local.stdout.split("ID", 1)[1])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shard = manifest["languages"]["xxx_Latn"]["shards"][0]
    ds = IndexedDataset(str(out / shard))
    bodies = [[int(t) for t in ds[i] if int(t) >= 5] for i in range(len(ds))]
    assert sorted(bodies) == sorted([[7, 9, 300], [11]])


@pytest.mark.slow
def test_merge_inputs_take_hub_ids_offline(hf_home, tmp_path):
    """``mmbert-ties-merge --base org/a --models org/b ...``: the same merge as from the snapshot folders."""
    snap = {name: str(hf_home / "hub" / f"models--org--{name}" / "snapshots" / SHA)
            for name in ("tiny-mlm", "tiny-mlm-b")}
    args = ["--method", "task_arithmetic", "--weights", "0.5", "0.5"]
    by_id = _run(hf_home, "megatron_mmbert.cli.ties_merge", "--base", "org/tiny-mlm", "--models",
                 "org/tiny-mlm-b", f"org/tiny-mlm-b@{SHA}", "--out", str(tmp_path / "by_id"), *args)
    assert by_id.returncode == 0, by_id.stderr[-3000:]
    by_path = _run(hf_home, "megatron_mmbert.cli.ties_merge", "--base", snap["tiny-mlm"], "--models",
                   snap["tiny-mlm-b"], snap["tiny-mlm-b"], "--out", str(tmp_path / "by_path"), *args)
    assert by_path.returncode == 0, by_path.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("by_id", "by_path"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_a_hub_tokenizers_files_are_fetched_and_copied_by_one_list(tmp_path):
    """What a Hub tokenizer download fetches is what checkpoints copy: a BPE tokenizer's merges.txt and
    a SentencePiece model under its own name reach the checkpoint's tokenizer/ folder."""
    import fnmatch

    from megatron_mmbert.checkpoints.layout import TOKENIZER_FILES, copy_tokenizer_files, has_tokenizer_files

    src = tmp_path / "snapshot"
    src.mkdir()
    names = ["tokenizer_config.json", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "config.json",
             "model.safetensors"]
    for name in names:
        (src / name).write_text("x")
    assert has_tokenizer_files(str(src))
    copied = copy_tokenizer_files(str(src), str(tmp_path / "ckpt" / "tokenizer"))
    assert copied == ["merges.txt", "sentencepiece.bpe.model", "tokenizer_config.json", "vocab.json"]
    fetched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in TOKENIZER_FILES)]
    assert sorted(fetched) == copied  # the download's allow-list is the same list
