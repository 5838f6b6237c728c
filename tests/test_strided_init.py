"""The strided init (convert/strided.py): a smaller model's checkpoint from a larger one's --
shapes, the rule (checked in Hugging Face's ModernBERT layout as well), and that it trains."""

import dataclasses

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import PRESETS, ConfigError
from megatron_mmbert.convert import hf as hf_map
from megatron_mmbert.convert.checkpoints import _single_process_model, load_canonical
from megatron_mmbert.convert.strided import layer_map, strided_checkpoint, strided_state_dict
from megatron_mmbert.checkpoints import dist as ckpt

BIG = dataclasses.replace(PRESETS["tiny"], hidden_size=64, num_attention_heads=4, intermediate_size=96, num_layers=4)
SMALL = dataclasses.replace(BIG, hidden_size=32, num_attention_heads=2, intermediate_size=48, num_layers=2)


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    runtime.shutdown()


def _big_state(seed=0):
    torch.manual_seed(seed)
    chunk = _single_process_model(BIG)
    with torch.no_grad():
        for p in chunk.parameters():
            p.copy_(torch.randn_like(p))  # distinct values everywhere: a wrong index shows
    return chunk, {k: v for k, v in chunk.state_dict().items() if torch.is_tensor(v)}


def test_published_models_map():
    """mmBERT-base -> mmBERT-small: stride 2 over hidden units and heads, every FFN unit and layer."""
    big, small = PRESETS["mmbert-base"], PRESETS["mmbert-small"]
    from megatron_mmbert.convert.strided import check_models

    check_models(big, small)
    assert layer_map(22, 22) == list(range(22)) and layer_map(4, 2) == [0, 3] and layer_map(22, 8)[-1] == 21


def test_shapes_and_rule_in_both_layouts():
    _, state = _big_state()
    small = strided_state_dict(state, BIG, SMALL)
    runtime.shutdown()
    expected = {k: tuple(v.shape) for k, v in _single_process_model(SMALL).state_dict().items() if torch.is_tensor(v)}
    assert {k: tuple(v.shape) for k, v in small.items()} == expected

    hid, heads, ffn, hd = torch.arange(0, 64, 2), torch.tensor([0, 2]), torch.arange(0, 96, 2), 16
    # In Hugging Face ModernBERT's layout (Wqkv rows [q|k|v][head][dim], Wi rows [activated|linear]),
    # a second statement of the same rule.
    big_hf, small_hf = hf_map.megatron_to_hf(state, BIG), hf_map.megatron_to_hf(small, SMALL)
    for j, i in enumerate([0, 3]):  # small layer j is big layer i
        wqkv = big_hf[f"model.layers.{i}.attn.Wqkv.weight"].view(3, 4, hd, 64)[:, heads][..., hid]
        assert torch.equal(small_hf[f"model.layers.{j}.attn.Wqkv.weight"], wqkv.reshape(3 * 2 * hd, 32))
        wo = big_hf[f"model.layers.{i}.attn.Wo.weight"][hid].view(32, 4, hd)[:, heads].reshape(32, 32)
        assert torch.equal(small_hf[f"model.layers.{j}.attn.Wo.weight"], wo)
        wi = big_hf[f"model.layers.{i}.mlp.Wi.weight"].view(2, 96, 64)[:, ffn][..., hid].reshape(96, 32)
        assert torch.equal(small_hf[f"model.layers.{j}.mlp.Wi.weight"], wi)
        assert torch.equal(small_hf[f"model.layers.{j}.mlp.Wo.weight"], big_hf[f"model.layers.{i}.mlp.Wo.weight"][hid][:, ffn])
        assert torch.equal(small_hf[f"model.layers.{j}.mlp_norm.weight"], big_hf[f"model.layers.{i}.mlp_norm.weight"][hid])
    assert f"model.layers.0.attn_norm.weight" not in small_hf  # layer 0 keeps its missing pre-norm
    emb = big_hf["model.embeddings.tok_embeddings.weight"][:, hid]
    assert torch.equal(small_hf["model.embeddings.tok_embeddings.weight"], emb)
    assert torch.equal(small_hf["head.dense.weight"], big_hf["head.dense.weight"][hid][:, hid])
    assert torch.equal(small_hf["decoder.bias"], big_hf["decoder.bias"])


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 8192}, "vocabularies differ"),
    ({"hidden_size": 48, "num_attention_heads": 3}, "whole multiple"),
    ({"num_attention_heads": 4}, "head size"),
    ({"num_layers": 5}, "cannot take 5 layers"),
])
def test_refused_pairs(change, message):
    with pytest.raises(ConfigError, match=message):
        strided_state_dict({}, BIG, dataclasses.replace(SMALL, **change))


@pytest.mark.slow
def test_strided_checkpoint_loads_and_trains(tmp_path):
    from tests.helpers.training import check, launch, tiny_run_config, train_records, write_manifest

    chunk, state = _big_state()
    ckpt.save_model(str(tmp_path / "big"), [chunk], BIG)
    runtime.shutdown()
    info = strided_checkpoint(str(tmp_path / "big"), str(tmp_path / "small"), SMALL)
    assert info["layers"] == [0, 3] and info["hidden_stride"] == 2 and info["rule"] == "strided-v1"
    runtime.shutdown()
    model, loaded = load_canonical(str(tmp_path / "small"))
    assert model == SMALL
    for k, v in strided_state_dict(state, BIG, SMALL).items():
        assert torch.equal(loaded[k], v), k
    runtime.shutdown()

    # The run option does the same at start-up: init.strided_from (a second run below).
    manifest = write_manifest(tmp_path / "shards")
    small_model = {f.name: getattr(SMALL, f.name) for f in dataclasses.fields(SMALL)
                   if f.name in ("hidden_size", "num_attention_heads", "intermediate_size", "num_layers")}

    def small_run(name, tokens, init):
        """A one-phase run of the small model, ``tokens`` long, from ``init``."""
        return tiny_run_config(str(tmp_path / f"{name}.yaml"), manifest, str(tmp_path / name),
                               model={"preset": "tiny", **small_model}, init=init,
                               phases=[{"name": "pretrain", "tokens": tokens, "seq_len": 64, "mask_rate": 0.3,
                                        "languages": "all", "temperature": 0.7}],
                               schedule={"total_tokens": tokens, "phases": {"pretrain": {"lr": 3.0e-3}}},
                               checkpoint={"every_steps": 0, "keep_last": 1})

    cfg = small_run("run", 2048, {"checkpoint": str(tmp_path / "small"), "load_optimizer": False})
    proc = check(launch(cfg))
    assert "initialised from" in proc.stdout + proc.stderr
    losses = [r["loss"] for r in train_records(str(tmp_path / "run")) if "loss" in r]
    assert len(losses) >= 3 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns from the strided start
    # init.strided_from: the run writes the strided checkpoint itself and starts from it.
    cfg2 = small_run("run2", 1024, {"strided_from": str(tmp_path / "big")})
    proc = check(launch(cfg2))
    assert "strided init: 32-wide model from" in proc.stdout + proc.stderr
    runtime.shutdown()
    _, written = load_canonical(str(tmp_path / "run2" / "strided_init"))
    assert all(torch.equal(written[k], loaded[k]) for k in loaded)


def test_cli_writes_the_smaller_checkpoint(tmp_path, capsys):
    import yaml

    from megatron_mmbert.cli.convert_checkpoint import main as convert_main

    chunk, state = _big_state(1)
    ckpt.save_model(str(tmp_path / "big"), [chunk], BIG)
    runtime.shutdown()
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2,
                                                         "intermediate_size": 48, "num_layers": 2}))
    args = ["strided-init", "--load", str(tmp_path / "big"), "--save", str(tmp_path / "small"),
            "--model", str(tmp_path / "small.yaml")]
    assert convert_main(args) == 0
    assert "layers [0, 3], strides hidden 2, heads 2, FFN 2" in capsys.readouterr().out
    assert ckpt.read_model_config(str(tmp_path / "small")) == SMALL
    ckpt.verify_checkpoint(str(tmp_path / "small"))
    assert convert_main(args) != 0  # an existing output is not replaced without --overwrite
