"""Run config: every shipped config validates, published parameter counts, one test per start-up
error, the LR schedule against mmBERT's formulas, the batch-size warmup plan."""

import glob
import math
import os

import pytest

from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.training import config as rc
from megatron_mmbert.training.batch_plan import rampup_rows
from megatron_mmbert.training.preflight import validate

from tests.helpers.launch import ROOT
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))


def _load(name, *overrides):
    return rc.load_config(os.path.join(ROOT, "examples", "configs", name), list(overrides))


def test_all_shipped_configs_are_there():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny_cpu.yaml", "mmbert_small.yaml", "mmbert_base.yaml", "decay_eng.yaml", "decay_cont.yaml",
            "decay_all.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_validates(path):
    cfg = rc.load_config(path)
    world = 2 if "tiny" in path else 8
    validate(cfg, world, check_data=False)
    # the resolved config round-trips through YAML to the same thing
    import yaml

    again = rc.from_mapping(yaml.safe_load(yaml.safe_dump(rc.resolved_dict(cfg))))
    assert rc.resolved_dict(again) == rc.resolved_dict(cfg)


def test_published_parameter_counts():
    base, small = _load("mmbert_base.yaml").model, _load("mmbert_small.yaml").model
    assert abs(base.num_parameters() - 307.8e6) / 307.8e6 < 1e-3, base.num_parameters()
    assert abs(small.num_parameters() - 140.9e6) / 140.9e6 < 1e-3, small.num_parameters()


def test_base_recipe_values():
    cfg = _load("mmbert_base.yaml")
    pre, mid, decay = cfg.phases
    assert (pre.seq_len, pre.global_rope_theta, pre.local_rope_theta) == (1024, 10000.0, 10000.0)
    assert (mid.seq_len, mid.global_rope_theta, decay.local_rope_theta) == (8192, 160000.0, 160000.0)
    assert cfg.batch.global_batch_size * pre.seq_len == 4_718_592
    seg = cfg.schedule.phases["decay"]
    assert (seg.lr, seg.decay_style, seg.final_lr_ratio, seg.decay_tokens) == (8e-4, "1-sqrt", 0.02, decay.tokens)
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2, cfg.optimizer.adam_eps) == (0.9, 0.95, 1e-8)
    from megatron_mmbert.training.optim import megatron_weight_decay

    assert megatron_weight_decay(cfg, pre) == pytest.approx(0.1)  # 8e-5 fully decoupled at 8e-4
    # batch warmup: 384 -> 4608 rows in 384-row increments over 60B tokens
    assert rampup_rows(cfg)[:2] == [384, 768] and rampup_rows(cfg)[-1] == 4224
    assert len(pre.languages) == 59 and len(mid.languages) == 108  # FineWeb2's; English and code: named sources


def test_decay_variants_branch_from_mid():
    """Decay variants keep their parent's whole schedule and start at its decay phase."""
    for name, parent in (("decay_eng.yaml", "mmbert_base.yaml"), ("decay_cont.yaml", "mmbert_base.yaml"),
                         ("decay_all.yaml", "mmbert_base.yaml"), ("mmbert_small_decay_all.yaml", "mmbert_small.yaml")):
        cfg, base = _load(name), _load(parent)
        assert cfg.init.checkpoint.endswith("phase_end_mid") and cfg.init.start_phase == "decay", name
        assert cfg.start_phase_index == 2 and [p.name for p in cfg.phases] == ["pretrain", "mid", "decay"]
        assert cfg.phases[:2] == base.phases[:2], name  # what fixes every stream's position at the decay
        assert (cfg.data_seed, cfg.batch, cfg.schedule) == (base.data_seed, base.batch, base.schedule), name
        decay = cfg.phases[2]
        assert (decay.mask_rate, decay.temperature, decay.tokens) == (0.05, 0.3, 100_000_000_000)
    assert _load("decay_eng.yaml").phases[2].fixed_shares["dclm"] > _load("decay_all.yaml").phases[2].fixed_shares["dclm"]
    assert _load("decay_all.yaml").phases[2].languages == "all"
    small = _load("mmbert_small_decay_all.yaml")
    assert small.model.hidden_size == 384 and small.schedule.phases["decay"].lr == 4e-4
    assert small.phases[2].languages == "all" and small.checkpoint.keep_last >= 10
    for name in ("decay_eng.yaml", "decay_cont.yaml", "decay_all.yaml"):  # the merge picks the best of 10
        assert _load(name).checkpoint.keep_last == 10, name


def test_decay_languages_are_the_mid_training_set():
    """Decay-Cont/-Eng train on exactly mid-training's languages: one named set, not top:N."""
    base = _load("mmbert_base.yaml")
    mid = base.phase("mid").languages
    assert isinstance(mid, list) and len(mid) == 108 and mid == base.language_sets["mmbert_mid"]
    for name in ("decay_cont.yaml", "decay_eng.yaml"):
        assert _load(name).phase("decay").languages == mid, name
    assert base.phase("pretrain").languages == base.language_sets["mmbert_pretrain"]


def test_language_sets_and_phase_edits_by_name(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(open(os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")).read()
                    + "language_sets:\n  few: [fra_Latn, deu_Latn]\n")
    child = tmp_path / "child.yaml"
    child.write_text("inherit: base.yaml\nphases:\n  mid: {languages: few, mask_rate: 0.2}\n")
    cfg = rc.load_config(str(child), ["--phases.decay.temperature", "0.4"])
    assert [p.name for p in cfg.phases] == ["pretrain", "mid", "decay"]
    assert cfg.phases[1].languages == ["fra_Latn", "deu_Latn"] and cfg.phases[1].mask_rate == 0.2
    assert cfg.phases[1].seq_len == 256 and cfg.phases[2].temperature == 0.4
    with pytest.raises(ConfigError, match="'nope' is not 'all', 'top:N' or a name in language_sets"):
        rc.load_config(str(child), ["--phases.mid.languages", "nope"])
    child.write_text("inherit: base.yaml\nphases:\n  cooldown: {mask_rate: 0.2}\n")
    with pytest.raises(ConfigError, match=r"\['cooldown'\] are not among the inherited phases"):
        rc.load_config(str(child))


def test_overrides_and_inherit():
    cfg = _load("mmbert_small.yaml", "--parallel.tensor_parallel", "2", "--phases.1.mask_rate=0.2")
    assert cfg.model.hidden_size == 384 and cfg.parallel.tensor_parallel == 2 and cfg.phases[1].mask_rate == 0.2
    assert cfg.schedule.phases["mid"].lr == 4e-4 and cfg.schedule.phases["pretrain"].lr == 8e-4


# -- one test per start-up error -------------------------------------------------------------------

def _tiny(*overrides):
    return _load("tiny_cpu.yaml", *overrides)


def _err(cfg, world=2, check_data=False):
    with pytest.raises(ConfigError) as e:
        validate(cfg, world, check_data=check_data)
    return str(e.value)


def test_unknown_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) optimizer.adam_beta3"):
        _tiny("--optimizer.adam_beta3", "0.9")


def test_wrong_type():
    with pytest.raises(ConfigError, match="batch.global_batch_size: expected an integer"):
        _tiny("--batch.global_batch_size", "sixteen")


def test_phase_budgets_do_not_add_up():
    msg = _err(_tiny("--phases.0.tokens", "200000"))
    assert "do not add up" in msg and "schedule.total_tokens" in msg


def test_missing_lr_segment():
    cfg = _tiny()
    del cfg.schedule.phases["mid"]
    assert "no LR segment for phase(s) ['mid']" in _err(cfg)


def test_warmup_plus_decay_exceed_phase():
    assert "exceed the phase's budget" in _err(_tiny("--schedule.phases.decay.warmup_tokens", "20000"))


def test_batch_not_divisible_by_data_parallel():
    assert "not a multiple of micro batch 4 x data-parallel size 3" in _err(_tiny(), world=3)


def _load_err(*overrides):
    """The error loading the tiny config with ``overrides`` (a section's own rule refuses it as it is built)."""
    with pytest.raises(ConfigError) as e:
        _tiny(*overrides)
    return e.value


def test_negative_time_limits():
    err = _load_err("--checkpoint.job_end_margin_minutes", "-5")
    assert "checkpoint.job_end_margin_minutes must be a finite number >= 0" in str(err) and "-5" in str(err)
    assert err.field == "checkpoint.job_end_margin_minutes"
    assert "checkpoint.exit_after_minutes must be" in str(_load_err("--checkpoint.exit_after_minutes", "-1"))
    cfg = _tiny()  # the same rule for a config changed in Python and handed to the library
    cfg.checkpoint.job_end_margin_minutes = -5.0
    with pytest.raises(ConfigError) as e:
        validate(cfg, 2, check_data=False)
    assert e.value.field == "checkpoint.job_end_margin_minutes"


def test_layout_error_before_process_group():
    assert "num_attention_heads=4 is not divisible by parallel.tensor_parallel=3" in _err(
        _tiny("--parallel.tensor_parallel", "3"), world=3)


def test_fp8_without_transformer_engine():
    from megatron_mmbert.model.backends import probe

    if probe().te_version is not None:
        pytest.skip("TransformerEngine installed")
    assert "model.fp8 cannot run on this machine: TransformerEngine is not installed" in _err(_tiny("--precision", "fp8"))


def test_validate_refuses_context_parallel(capsys):
    """``pretrain_mmbert.py --validate`` with CP 2 exits non-zero and names the field."""
    import pretrain_mmbert

    code = pretrain_mmbert.main(["--config", os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"),
                                 "--validate", "--skip-data", "--world-size", "2",
                                 "--parallel.context_parallel", "2"])
    assert code != 0 and "parallel.context_parallel=2 is not supported" in capsys.readouterr().err


def test_start_phase_unknown():
    assert "init.start_phase='cooldown' is not a phase" in _err(_tiny("--init.start_phase", "cooldown"))


def test_missing_manifest(tmp_path):
    msg = _err(_tiny("--data.manifest", str(tmp_path / "nope")), check_data=True)
    assert "no manifest.json there" in msg and "preprocess_data.py" in msg


def test_phase_language_without_shards(tmp_path):
    from tests.helpers.training import write_manifest

    manifest = write_manifest(tmp_path)
    msg = _err(_tiny("--data.manifest", manifest, "--phases.0.languages", "all",
                     "--phases.1.languages", "[fra_Latn, xxx_Zzzz]"), check_data=True)
    assert "language(s) ['xxx_Zzzz'] have no shards" in msg


def test_init_checkpoint_missing(tmp_path):
    from tests.helpers.training import write_manifest

    manifest = write_manifest(tmp_path)
    msg = _err(_tiny("--data.manifest", manifest, "--phases.0.languages", "all", "--phases.1.languages", "all",
                     "--init.checkpoint", str(tmp_path / "ckpt")), check_data=True)
    assert "is not a finished checkpoint" in msg


def test_rampup_not_divisible():
    assert "batch warmup" in _err(_tiny("--batch.rampup_start_rows", "6", "--batch.rampup_increment_rows", "10"))


# -- schedule and batch plan -----------------------------------------------------------------------

def test_lr_schedule_matches_mmbert_formulas():
    """megatron's OptimizerParamScheduler, driven in tokens, against bert24's formulas."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: F401

    from megatron_mmbert.config import PhaseConfig
    from megatron_mmbert.training.optim import phase_scheduler, reference_lr

    class FakeGroups:  # the scheduler only touches param_groups
        param_groups = [{"params": [torch.zeros(1)]}]

    for style in ("1-sqrt", "linear"):
        cfg = _tiny(f"--schedule.phases.decay.decay_style={style}", "--schedule.phases.decay.warmup_tokens=4096")
        phase = PhaseConfig(name="decay", tokens=61440, seq_len=256)
        seg = cfg.schedule.phases["decay"]
        opt = FakeGroups()
        sched = phase_scheduler(cfg, opt, phase)
        t = 0
        for inc in [0] + [2048] * 30:
            sched.step(inc) if inc else None
            t += inc
            assert opt.param_groups[0]["lr"] == pytest.approx(reference_lr(seg, phase.tokens, t), rel=1e-9, abs=1e-15)
        assert opt.param_groups[0]["lr"] == pytest.approx(seg.lr * seg.final_lr_ratio)


def test_batch_rampup_plan():
    from megatron_mmbert.training.batch_plan import phase_steps, step_rows

    cfg = _tiny()
    pre = cfg.phases[0]
    # 8 rows x 128 tokens per step until 16384 tokens (128 rows), then 16 rows
    assert [step_rows(cfg, pre, c, 1280) for c in (0, 8, 120, 128, 144, 1272)] == [8, 8, 8, 16, 16, 8]
    assert phase_steps(cfg, pre, 1280) == 16 + (1280 - 128) // 16


def test_train_state_round_trip_and_older_checkpoints():
    """The checkpoint record of a TrainState reads back the same; a record of an older version (no
    ``first_phase_index``, ``rng`` in prose) still resumes, positioned by phase name."""
    from megatron_mmbert.training.state import RngRecipe, TrainState

    st = TrainState(phase_index=1, first_phase_index=0)
    st.advance("mid", 8, 1024)
    st.advance("mid", 8, 1024)
    record = st.to_checkpoint("mid", {"num_steps": 2048}, seed=21, data_seed=5, data_position={})
    assert record["rng"] == RngRecipe.RESEED_PER_STEP.value and record["step"] == 2 and record["tokens"] == 2048
    assert TrainState.from_checkpoint(record, ["pretrain", "mid", "decay"]) == st
    older = {"phase": "mid", "phase_index": 0, "step": 7, "tokens": 900, "consumed_samples": 56,
             "consumed_samples_per_phase": {"mid": 56}, "skipped_steps": 1,
             "rng": "re-seeded from (seed, step) every step; nothing else to restore"}
    resumed = TrainState.from_checkpoint(older, ["mid", "decay"])
    assert (resumed.phase_index, resumed.first_phase_index, resumed.step, resumed.consumed_samples) == (0, None, 7, 56)


def test_checkpoint_every_tokens():
    """10B-token saves: every ~2120 steps at 4608 x 1024, every ~265 at 4608 x 8192."""
    from megatron_mmbert.training.loop import save_due

    cfg = _load("mmbert_base.yaml")
    assert (cfg.checkpoint.every_tokens, cfg.checkpoint.every_steps) == (10_000_000_000, 0)
    for seq in (1024, 8192):
        step_tokens = 4608 * seq
        saves = [s for s in range(1, 3000) if save_due(cfg, s, s * step_tokens, step_tokens)]
        assert saves[0] == -(-10_000_000_000 // step_tokens)  # the first step at or past 10B
        assert all(s * step_tokens // 10**10 - (s - 1) * step_tokens // 10**10 == 1 for s in saves)
        assert len(saves) == 2999 * step_tokens // 10**10


def test_mmbert_configs_use_stable_adamw_without_clipping():
    import yaml

    with open(os.path.join(ROOT, "examples", "configs", "mmbert_base.yaml")) as f:
        raw = yaml.safe_load(f)["optimizer"]
    assert raw["name"] == "stable_adamw" and raw["clip_grad"] == 0  # said explicitly in the file
    for name in ("mmbert_base.yaml", "mmbert_small.yaml", "decay_cont.yaml", "decay_eng.yaml", "decay_all.yaml"):
        cfg = _load(name)
        assert (cfg.optimizer.name, cfg.optimizer.clip_grad) == ("stable_adamw", 0.0), name
        assert cfg.use_distributed_optimizer and cfg.precision == "amp_bf16", name


def test_mmbert_configs_mask_special_tokens():
    """mmBERT's masking skips only padding: <bos>/<eos> can be selected (issue 19)."""
    for name in ("mmbert_base.yaml", "mmbert_small.yaml", "decay_cont.yaml", "decay_eng.yaml", "decay_all.yaml",
                 "mmbert_small_decay_all.yaml"):
        assert _load(name).data.mask_special_tokens, name


def test_mmbert_configs_pack_best_fit():
    """mmBERT packs <bos> ... <eos> chunks best-fit (issue 19) into packed rows of micro_batch x seq_len
    (issue 26); the tiny CPU config keeps concat (fast tests)."""
    for name in ("mmbert_base.yaml", "mmbert_small.yaml", "decay_cont.yaml", "decay_eng.yaml", "decay_all.yaml",
                 "mmbert_small_decay_all.yaml"):
        cfg = _load(name)
        assert cfg.data.packing == "best_fit" and cfg.data.packed_row == "micro_batch", name
        # the reference's geometry: one packed row per micro-batch (issue 26)
        assert cfg.packing_bin_rows() == [cfg.phase_micro_batch(p) for p in cfg.phases], name
    assert _load("mmbert_base.yaml").packing_bin_rows() == [48, 6, 6]
    assert _load("mmbert_base.yaml", "--data.packed_row", "seq_len").packing_bin_rows() is None
    assert _load("tiny_cpu.yaml").data.packing == "concat" and _load("tiny_cpu.yaml").packing_bin_rows() is None


def _reference_ramp(min_rows, max_rows, warmup_tokens, world_size, row_tokens, steps):
    """Per-device rows of the first ``steps`` steps as ModernBERT/mmBERT's ``BatchSizeWarmupScheduler``
    (src/sequence_packer.py) chooses them: size thresholds ``ceil(warmup/world / sum(sizes) x
    cumsum)`` over the per-device tokens seen before the step (float arithmetic, as there)."""
    warm = math.ceil(warmup_tokens / world_size)
    per_unit = warm / sum(range(min_rows, max_rows))
    thresholds, cum = [], 0
    for b in range(min_rows, max_rows):
        cum += b
        thresholds.append(math.ceil(per_unit * cum))
    out, seen = [], 0
    for _ in range(steps):
        b = max_rows if seen >= warm else next((min_rows + i for i, t in enumerate(thresholds) if seen < t), max_rows)
        out.append(b)
        seen += b * row_tokens
    return out


@pytest.mark.parametrize("name,ramp_tokens", [("mmbert_base.yaml", 60_000_000_000), ("mmbert_small.yaml", 100_000_000_000)])
def test_batch_rampup_matches_the_reference_scheduler(name, ramp_tokens):
    """Equal steps per size: the shipped ramp step for step equals mmBERT's scheduler on 8 GPUs
    (micro 48 x 1024 per packed row, 1 -> 12 rows per device)."""
    from megatron_mmbert.training.batch_plan import step_rows

    cfg = _load(name)
    pre = cfg.phases[0]
    assert cfg.batch.rampup_tokens == ramp_tokens
    world, micro = 8, cfg.phase_micro_batch(pre)
    n = pre.tokens // pre.seq_len
    ours, consumed = [], 0
    while consumed * pre.seq_len < ramp_tokens + 4608 * 1024:
        rows = step_rows(cfg, pre, consumed, n)
        ours.append(rows)
        consumed += rows
    ref = _reference_ramp(1, 12, ramp_tokens, world, micro * pre.seq_len, len(ours))
    assert ours == [r * world * micro for r in ref]
    per_size = [ours.count(384 * k) for k in range(1, 12)]
    assert max(per_size) - min(per_size) <= 1  # the same number of steps at every size
    if name == "mmbert_base.yaml":  # the numbers: ~2,312 steps per size, 25,432 ramp steps
        assert sum(per_size) == 25_432 and set(per_size) <= {2311, 2312, 2313}


def test_phase_manifest_checked(tmp_path):
    from tests.helpers.training import write_manifest

    manifest = write_manifest(tmp_path)
    msg = _err(_tiny("--data.manifest", manifest, "--phases.0.languages", "all", "--phases.1.languages", "all",
                     "--phases.1.manifest", str(tmp_path / "hq" / "manifest.json")), check_data=True)
    assert "phase 'mid': manifest" in msg and "does not exist" in msg
    msg = _err(_tiny("--data.manifest", manifest, "--phases.0.languages", "all", "--phases.1.languages",
                     "[xxx_Zzzz]", "--phases.1.manifest", manifest), check_data=True)
    assert "language(s) ['xxx_Zzzz'] have no tokens in its manifest" in msg


def test_micro_batch_packed_rows_need_a_packed_backend_beyond_small_micro_batches():
    """data.packed_row: micro_batch attends a micro-batch as one sequence: the sdpa backend (a dense mask)
    is refused beyond 8192 tokens a micro-batch, with the fix; packed backends and seq_len rows pass."""
    from megatron_mmbert.training.preflight import check_packed_row_backend

    cfg = _load("mmbert_base.yaml")
    with pytest.raises(ConfigError, match="data.packed_row: seq_len") as e:
        check_packed_row_backend(cfg, "sdpa")
    assert e.value.field == "data.packed_row" and "48 x 1024" in str(e.value)
    for backend in ("te", "flash", "flex"):
        check_packed_row_backend(cfg, backend)
    check_packed_row_backend(_load("mmbert_base.yaml", "--data.packed_row", "seq_len"), "sdpa")
    small = _load("mmbert_base.yaml", "--batch.micro_batch_size", "8", "--batch.micro_batch_size_per_phase",
                  "{mid: 1, decay: 1}")
    check_packed_row_backend(small, "sdpa")  # 8 x 1024 and 1 x 8192: attended as they are
