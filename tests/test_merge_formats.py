"""tools/ties_merge.py on a mix of Hugging Face and megatron inputs, writing either format.

The reference is the same merge of the all-HF equivalents (HF in, HF out: no conversion anywhere).
Megatron inputs are made from those HF models by the project's importer, so a merge that mixes them
must give the very same tensors bit for bit: the conversion is a permutation of QKV rows and
zero padding of the vocabulary, and the merge runs in HF naming whatever the inputs.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_mmbert import runtime
from megatron_mmbert.cli.ties_merge import main as cli_main
from megatron_mmbert.convert import hf as hf_map
from megatron_mmbert.convert.checkpoints import import_hf, load_canonical, read_hf_config
from megatron_mmbert.checkpoints.layout import CheckpointError
from megatron_mmbert.merge.stream import merge_checkpoints
from megatron_mmbert.merge.ties import MergeSpec
from tests.helpers.model import make_hf_model, save_word_tokenizer

# 32 KiB of float64: the embedding (333 x 48) spans four row blocks and a QKV (144 x 48) two, so
# megatron QKV rows are regrouped across a block boundary. (Smaller blocks only add megatron reads,
# each a dist_checkpointing.load call.)
BLOCK = 32768



@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    hf = {name: str(root / f"hf_{name}") for name in ("base", "m0", "m1")}
    for seed, path in enumerate(hf.values()):
        make_hf_model("even", path, seed=seed)  # vocab 333: padded to 384 in megatron
    save_word_tokenizer(hf["base"])
    meg = {name: str(root / f"meg_{name}") for name in ("base", "m0")}
    for name, path in meg.items():
        import_hf(hf[name], path)
        runtime.shutdown()
    return root, hf, meg


def _hf_state(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _reference(root, hf, spec, name):
    out = str(root / f"ref_{name}")
    if not os.path.exists(out):
        merge_checkpoints(hf["base"], [hf["m0"], hf["m1"]], spec, out, chunk_bytes=BLOCK, log=None)
    return _hf_state(out)


def _assert_megatron_equals(path, ref, model):
    _, got = load_canonical(path)
    runtime.shutdown()
    want = hf_map.hf_to_megatron(ref, model, model.padded_vocab_size(1))
    assert set(want) <= set(got)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    assert not got["output_layer.bias"][model.vocab_size:].any()  # padding written as zeros


SPEC_GLOBAL = dict(method="ties", density=0.3, lam=1.2, trim="global", weights=[0.7, 1.3])
SPEC_TENSOR = dict(method="ties", density=0.3, lam=1.2, trim="per-tensor")


def test_megatron_base_mixed_models_default_megatron_output(family, tmp_path):
    root, hf, meg = family
    ref = _reference(root, hf, MergeSpec(**SPEC_GLOBAL), "global")
    base = _hf_state(hf["base"])
    assert any(not torch.equal(ref[k], base[k]) for k in ref)  # the merge changed the model
    out = str(tmp_path / "out")
    report = merge_checkpoints(meg["base"], [meg["m0"], hf["m1"]], MergeSpec(**SPEC_GLOBAL), out,
                               chunk_bytes=BLOCK, log=None)
    assert report["checkpoint_format"] == "megatron" and report["merge_naming"] == "hf"
    assert report["input_formats"] == ["megatron", "megatron", "hf"]
    assert set(report["tensors"]) == set(ref)  # HF names, decoder.weight merged once (as the embedding)
    model = read_hf_config(hf["base"])
    _assert_megatron_equals(out, ref, model)
    # the base's model config (no training state) and its tokenizer, where import-hf keeps them
    config = json.load(open(os.path.join(out, "mmbert_config.json")))
    assert config["model"] == json.load(open(os.path.join(meg["base"], "mmbert_config.json")))["model"]
    tokenizer = sorted(os.listdir(os.path.join(meg["base"], "tokenizer")))
    assert "tokenizer.json" in tokenizer and sorted(os.listdir(os.path.join(out, "tokenizer"))) == tokenizer


def test_megatron_base_hf_output_via_cli(family, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    root, hf, meg = family
    ref = _reference(root, hf, MergeSpec(**SPEC_TENSOR), "tensor")
    out = str(tmp_path / "out")
    rc = cli_main(["--base", meg["base"], "--models", meg["m0"], hf["m1"], "--density", "0.3", "--lambda", "1.2",
                   "--out-format", "hf", "--out", out, "--chunk-mb", str(BLOCK / 2**20), "--quiet"])
    assert rc == 0
    got = _hf_state(out)
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.decoder.weight.data_ptr() == model.model.embeddings.tok_embeddings.weight.data_ptr()
    sd = model.state_dict()
    for key in ref:
        assert torch.equal(sd[key], ref[key]), key
    # config converted from mmbert_config.json, special ids from the base's tokenizer, which is copied
    config = json.load(open(os.path.join(out, "config.json")))
    source = json.load(open(os.path.join(hf["base"], "config.json")))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "local_attention", "global_attn_every_n_layers", "pad_token_id", "bos_token_id", "cls_token_id"):
        assert config[key] == source[key], key
    assert AutoTokenizer.from_pretrained(out).mask_token_id == 4


def test_hf_base_megatron_output(family, tmp_path):
    root, hf, meg = family
    ref = _reference(root, hf, MergeSpec(**SPEC_TENSOR), "tensor")
    out = str(tmp_path / "out")
    report = merge_checkpoints(hf["base"], [meg["m0"], hf["m1"]], MergeSpec(**SPEC_TENSOR), out,
                               out_format="megatron", chunk_bytes=BLOCK, log=None)
    assert report["input_formats"] == ["hf", "megatron", "hf"]
    model = read_hf_config(hf["base"])
    _assert_megatron_equals(out, ref, model)
    assert json.load(open(os.path.join(out, "mmbert_config.json")))["model"]["num_attention_heads"] == 4
    assert "tokenizer.json" in os.listdir(os.path.join(out, "tokenizer"))


def test_config_mismatch_is_refused(family, tmp_path):
    """Same tensor shapes, different head count: only the config check can catch it (the QKV rows
    would be regrouped differently), and it names both checkpoints."""
    root, hf, meg = family
    odd = str(tmp_path / "two_heads")
    shutil.copytree(hf["m1"], odd)
    with open(os.path.join(odd, "config.json")) as f:
        config = json.load(f)
    config["num_attention_heads"] = 2
    with open(os.path.join(odd, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=r"model configs differ: .*meg_base has num_attention_heads 4 but "
                       r".*two_heads has 2"):
        merge_checkpoints(meg["base"], [meg["m0"], odd], MergeSpec(density=0.5), str(tmp_path / "o"), log=None)
    assert not os.path.exists(tmp_path / "o")
