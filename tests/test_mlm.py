"""The MLM stream: packed rows read back through megatron-core, masking statistics, determinism."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.data.mlm import IGNORE_INDEX, MLMStream

from tests.helpers.corpus import SPECIAL, VOCAB, write_corpus

PHASES = [
    PhaseConfig(name="pretrain", tokens=64 * 400, seq_len=64, temperature=0.7, languages="top:3", mask_rate=0.3),
    PhaseConfig(name="decay", tokens=128 * 200, seq_len=128, temperature=0.5, temperature_end=0.3,
                mask_rate=0.15, mask_rate_end=0.05),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    return write_corpus(root, [60, 25, 8, 3], shards_per_lang=2)


@pytest.fixture(scope="module")
def stream(corpus):
    return MLMStream(corpus[0], PHASES, seed=7, cache_dir=None)


def test_batch_contract(stream):
    b = stream.batch("pretrain", [0, 1, 2, 3])
    assert set(b) == {"tokens", "labels", "positions", "cu_seqlens", "max_seqlen"}
    for k in ("tokens", "labels", "positions"):
        assert b[k].dtype == torch.int64 and b[k].shape == (4, 64)
    cu = b["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 4 * 64
    assert set(range(0, 4 * 64 + 1, 64)) <= set(cu.tolist())  # segments never cross rows
    seg = torch.diff(cu)
    assert b["max_seqlen"] == int(seg.max())
    pos = b["positions"].reshape(-1)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert pos[a:e].tolist() == list(range(e - a))


def test_rows_are_the_documents(stream, corpus):
    _, texts = corpus
    # Unmasked rows read through megatron-core equal the documents written, piece by piece.
    for phase in ("pretrain", "decay"):
        k = stream.phase_names.index(phase)
        pidx = stream.index.phases[k]
        for i in range(0, stream.phase_num_samples(phase), 7):
            tokens, segs, lang = stream.row(phase, i)
            lang_col = int(pidx.dataset_index[i])
            pieces = pidx.row_pieces(lang_col, int(pidx.dataset_sample_index[i]))
            expected = np.concatenate([texts[lang][d][a:b] for d, a, b, _ in pieces])
            np.testing.assert_array_equal(tokens, expected)
            assert len(tokens) == pidx.plan.phase.seq_len and sum(segs) == len(tokens)
    # inactive language l3 never appears in the top:3 phase
    assert "l3" not in {stream.row("pretrain", i)[2] for i in range(stream.phase_num_samples("pretrain"))}


def test_masking_statistics_over_a_million_tokens(corpus):
    phases = [PhaseConfig(name="m", tokens=64 * 18000, seq_len=64, temperature=0.5, mask_rate=0.3)]
    s = MLMStream(corpus[0], phases, seed=3, cache_dir=None)
    special = np.array(sorted(SPECIAL.values()))
    sel = masked = rand = kept = cand = 0
    for i in range(s.phase_num_samples("m")):
        tokens, _, _ = s.row("m", i)
        out, labels = s.mask(tokens, 0.3, i)
        picked = labels != IGNORE_INDEX
        is_special = np.isin(tokens, special)
        assert not (picked & is_special).any()  # special tokens never masked
        np.testing.assert_array_equal(out[~picked], tokens[~picked])
        np.testing.assert_array_equal(labels[picked], tokens[picked])
        new = out[picked]
        m = new == SPECIAL["mask"]
        same = (new == tokens[picked]) & ~m
        r = ~m & ~same
        assert not np.isin(new[r], special).any()  # replacements never special
        assert ((new[r] >= 0) & (new[r] < VOCAB)).all()
        sel += picked.sum(); masked += m.sum(); rand += r.sum(); kept += same.sum(); cand += (~is_special).sum()
    assert cand > 1_000_000
    assert abs(sel / cand - 0.3) < 0.005
    # a random replacement equal to the original counts as "kept" (probability 1/vocab)
    assert abs(masked / sel - 0.8) < 0.01 and abs(rand / sel - 0.1) < 0.01 and abs(kept / sel - 0.1) < 0.01


def test_mask_rate_annealing(stream):
    n = stream.phase_num_samples("decay")
    assert stream.mask_rate("decay", 0) == pytest.approx(0.15)
    assert stream.mask_rate("decay", n - 1) == pytest.approx(0.05)
    assert stream.mask_rate("pretrain", 5) == pytest.approx(0.3)


@pytest.mark.slow
def test_same_rows_across_runs_and_processes(corpus, stream, tmp_path):
    again = MLMStream(corpus[0], PHASES, seed=7, cache_dir=str(tmp_path / "cache"))
    idx = [0, 5, 17, 123]
    a = stream.batch("decay", idx)
    b = again.batch("decay", idx)
    for k in ("tokens", "labels", "positions", "cu_seqlens"):
        assert torch.equal(a[k], b[k])
    other = MLMStream(corpus[0], PHASES, seed=8, cache_dir=None).batch("decay", idx)
    assert not torch.equal(a["labels"], other["labels"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from megatron_mmbert.config import PhaseConfig\n"
        "from megatron_mmbert.data.mlm import MLMStream\n"
        "from tests.test_mlm import PHASES\n"
        "b = MLMStream(%r, PHASES, seed=7, cache_dir=%r).batch('decay', %r)\n"
        "torch.save({k: v for k, v in b.items()}, %r)\n"
    ) % (root, corpus[0], str(tmp_path / "cache"), idx, str(tmp_path / "b.pt"))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    c = torch.load(str(tmp_path / "b.pt"))
    for k in ("tokens", "labels", "positions", "cu_seqlens"):
        assert torch.equal(a[k], c[k])


def test_micro_batches_split_over_ranks(stream):
    gbs, mbs, dp = 8, 2, 2
    seen = []
    for rank in range(dp):
        for mb in stream.micro_batches("pretrain", 16, gbs, mbs, rank, dp):
            seen.append(mb["tokens"])
    n = stream.phase_num_samples("pretrain")
    steps = (n - 16) // gbs
    assert len(seen) == steps * gbs // mbs
    # rank 0's first micro-batch is samples 16, 17; rank 1's first is 20, 21
    r0 = next(stream.micro_batches("pretrain", 16, gbs, mbs, 0, dp))
    r1 = next(stream.micro_batches("pretrain", 16, gbs, mbs, 1, dp))
    assert torch.equal(r0["tokens"], stream.batch("pretrain", [16, 17])["tokens"])
    assert torch.equal(r1["tokens"], stream.batch("pretrain", [20, 21])["tokens"])
    with pytest.raises(ValueError, match="multiple"):
        next(stream.micro_batches("pretrain", 3, gbs, mbs, 0, dp))


def test_special_tokens_selected_at_the_mask_rate_when_enabled(corpus):
    """mask_special_tokens (the shipped mmBERT configs): <bos>/<eos> are selected like any token."""
    phases = [PhaseConfig(name="m", tokens=64 * 3000, seq_len=64, temperature=0.5, mask_rate=0.3)]
    s = MLMStream(corpus[0], phases, seed=5, cache_dir=None, mask_special_tokens=True)
    special = np.array(sorted(SPECIAL.values()))
    sel_special = n_special = sel_other = n_other = 0
    for i in range(s.phase_num_samples("m")):
        tokens, _, _ = s.row("m", i)
        _, labels = s.mask(tokens, 0.3, i)
        picked = labels != IGNORE_INDEX
        is_special = np.isin(tokens, special)
        sel_special += (picked & is_special).sum(); n_special += is_special.sum()
        sel_other += (picked & ~is_special).sum(); n_other += (~is_special).sum()
    assert n_special > 5000
    # binomial standard error at 5000 draws is 0.0065: 4 sigma
    assert abs(sel_special / n_special - 0.3) < 0.026 and abs(sel_other / n_other - 0.3) < 0.005


def test_phase_with_its_own_manifest_reads_only_from_it(tmp_path):
    """A phase naming its own manifest (mid/decay's HQ sources) reads only that manifest's documents,
    as streams of their own that later phases naming it continue; the other phases and the run
    manifest's streams are untouched."""
    from megatron_mmbert.data.shards import SOURCE_SEPARATOR

    main, main_texts = write_corpus(str(tmp_path / "web"), [30, 12], seed=1)
    hq, hq_texts = write_corpus(str(tmp_path / "hq"), [9, 6, 4], seed=2)
    phases = [PhaseConfig(name="pre", tokens=64 * 20, seq_len=64, temperature=0.5),
              PhaseConfig(name="mid", tokens=64 * 12, seq_len=64, temperature=0.5, manifest=hq,
                          languages=["l0", "l2"], fixed_shares={"l0": 0.5}),
              PhaseConfig(name="decay", tokens=64 * 8, seq_len=64, temperature=0.3, manifest=str(tmp_path / "hq"))]
    s = MLMStream(main, phases, seed=4, cache_dir=None)
    for phase, texts, allowed in (("pre", main_texts, {"l0", "l1"}), ("mid", hq_texts, {"l0", "l2"}),
                                  ("decay", hq_texts, {"l0", "l1", "l2"})):
        k = s.phase_names.index(phase)
        pidx = s.index.phases[k]
        seen = set()
        for i in range(s.phase_num_samples(phase)):
            tokens, _, lang = s.row(phase, i)
            source, _, key = lang.rpartition(SOURCE_SEPARATOR)
            assert (source != "") == (phase != "pre"), lang
            seen.add(key)
            pieces = pidx.row_pieces(int(pidx.dataset_index[i]), int(pidx.dataset_sample_index[i]))
            np.testing.assert_array_equal(tokens, np.concatenate([texts[key][d][a:b] for d, a, b, _ in pieces]))
        assert seen <= allowed and "l0" in seen, (phase, seen)
    plan = s.index.plan
    hq_streams = [lang for lang in plan["language_tokens"] if SOURCE_SEPARATOR in lang]
    assert len(hq_streams) == 3 and len(plan["sources_sha256"]) == 1
    # decay continues the HQ streams where mid stopped; the web streams do not move after pre
    mid, decay = plan["phases"][1]["languages"], plan["phases"][2]["languages"]
    for lang in hq_streams:
        assert decay[lang]["first_token"] == mid[lang]["first_token"] + mid[lang]["tokens"]
    assert all(decay[lang]["first_token"] == plan["phases"][0]["languages"][lang]["tokens"] for lang in ("l0", "l1"))


@pytest.mark.parametrize("bin_rows", [None, [4]], ids=["seq_len_rows", "micro_batch_rows"])
def test_best_fit_padding_is_never_masked_nor_predicted(corpus, bin_rows):
    """best_fit rows end in padding: its own cu_seqlens segment, labels ignored (no loss), never
    selected even when special tokens are (mmBERT masks everything but padding)."""
    s = MLMStream(corpus[0], [PhaseConfig(name="m", tokens=64 * 60, seq_len=64, temperature=0.5, mask_rate=0.5)],
                  seed=3, cache_dir=None, packing="best_fit", mask_special_tokens=True, bin_rows=bin_rows)
    n = s.phase_num_samples("m")
    b = s.batch("m", range(n))
    cu = b["cu_seqlens"].tolist()
    total_pad = selected_special = 0
    for i in range(n):
        tokens, segs, _, pad = s.row_with_padding("m", i)
        labels = b["labels"][i].numpy()
        # every best_fit row starts a <bos> ... <eos> sequence, or goes on with the previous row's
        assert tokens[0] == SPECIAL["bos"] or (bin_rows and b["positions"][i, 0] > 0) or pad == 64
        if pad:
            assert (tokens[-pad:] == s.pad_id).all() and (b["tokens"][i, -pad:].numpy() == s.pad_id).all()
            assert (labels[-pad:] == IGNORE_INDEX).all()
            assert i * 64 + 64 - pad in cu  # the padding is a segment of its own
        real = labels[: 64 - pad]
        selected_special += int(np.isin(real[real != IGNORE_INDEX], [SPECIAL["bos"], SPECIAL["eos"]]).sum())
        total_pad += pad
    assert total_pad > 0 and selected_special > 0  # padding exists; special tokens are selected
    # the loss sees padding nowhere: per-token CE over labels != -100 never reaches a pad position
    mask = b["labels"] != IGNORE_INDEX
    assert not (mask & (b["tokens"] == s.pad_id) & (b["labels"] == s.pad_id)).any()


@pytest.mark.parametrize("bin_rows", [None, [2, 2]], ids=["seq_len_rows", "micro_batch_rows"])
def test_best_fit_rows_are_the_same_across_caches_and_resumes(corpus, tmp_path, bin_rows):
    """Resume guarantees in best_fit mode: a cached and an in-memory index give the same batches, and
    micro_batches from a consumed count are the samples a fresh walk reaches there."""
    a = MLMStream(corpus[0], PHASES, seed=7, cache_dir=None, packing="best_fit", bin_rows=bin_rows)
    b = MLMStream(corpus[0], PHASES, seed=7, cache_dir=str(tmp_path / "cache"), packing="best_fit", bin_rows=bin_rows)
    idx = [0, 5, 17, 123]
    ba, bb = a.batch("decay", idx), b.batch("decay", idx)
    for k in ("tokens", "labels", "positions", "cu_seqlens"):
        assert torch.equal(ba[k], bb[k])
    assert not torch.equal(ba["tokens"], MLMStream(corpus[0], PHASES, seed=7, cache_dir=None).batch("decay", idx)["tokens"])
    gbs, mbs, dp = 8, 2, 2
    fresh = [mb["tokens"] for mb in b.micro_batches("pretrain", 0, gbs, mbs, 1, dp)]
    resumed = [mb["tokens"] for mb in b.micro_batches("pretrain", 16, gbs, mbs, 1, dp)]
    assert all(torch.equal(x, y) for x, y in zip(fresh[4:], resumed)) and len(fresh) - 4 == len(resumed)
    assert torch.equal(resumed[0], a.batch("pretrain", [20, 21])["tokens"])
