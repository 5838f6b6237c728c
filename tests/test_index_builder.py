"""The C++ index builder against megatron-core's helpers and numpy, plus the index cache."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron.core.datasets import helpers_cpp
from megatron.core.datasets.helpers import build_sample_idx

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.data import _index_builder as ib
from megatron_mmbert.data.index import build_blending_indices, build_data_index, pack_rows
from megatron_mmbert.data.shards import load_manifest

from tests.helpers.corpus import SPECIAL, write_corpus


def megatron_blend(w, n):
    di = np.zeros(n, np.int16)
    dsi = np.zeros(n, np.int64)
    helpers_cpp.build_blending_indices(di, dsi, w, len(w), n, False)
    return di, dsi


def skewed(rng, L):
    n = rng.lognormal(0, 3, L)
    w = n ** rng.uniform(0.1, 1.0)
    return w / w.sum()


# The kernels this machine can run: the portable one always, AVX2 / AVX-512 where the CPU has them.
KERNELS = ib.available_kernels()


def _block(w, n, lengths=(), kernel="auto", phases=None, sizes=None, max_margin=8.0):
    """The block path forced (fast_min_datasets=1) with the given block lengths and kernel."""
    W = w if w.ndim == 2 else w[None]
    S = np.array([n], np.int64) if sizes is None else sizes
    P = np.zeros(len(S), np.int64) if phases is None else phases
    return ib.build_blending_indices(W, S, P, "fast", 1, list(lengths), kernel, max_margin)


@pytest.mark.parametrize("L", [1, 2, 3, 5, 17, 60, 300, 2000])
def test_single_phase_identical_to_megatron(L):
    rng = np.random.default_rng(L)
    for n in (1, 2, 97, int(rng.integers(1000, 60000))):
        w = skewed(rng, L)
        ref = megatron_blend(w, n)
        runs = [build_blending_indices(w[None], np.array([n], np.int64), algorithm=a) for a in ("fast", "scan")]
        runs += [_block(w, n, kernel=k)[:3] for k in KERNELS]  # block path even where the plain loop is used
        for di, dsi, counts in runs:
            assert di.dtype == np.int16 and dsi.dtype == np.int64
            np.testing.assert_array_equal(di, ref[0])
            np.testing.assert_array_equal(dsi, ref[1])
            np.testing.assert_array_equal(counts[0], np.bincount(ref[0], minlength=L))


def test_megatron_published_example():
    di, dsi, _ = build_blending_indices(np.array([[0.7, 0.2, 0.1]]), np.array([10], np.int64))
    assert di.tolist() == [0, 1, 0, 2, 0, 0, 1, 0, 0, 0]


# Block lengths (outermost first) that push the block path into its rare branches: one level, very
# short blocks (many selections and early stops), five levels (the run-time depth loop), and an
# innermost set too large for registers (the memory-resident kernel).
TUNINGS = [[], [1], [3, 1], [40, 9, 2], [2000, 700, 90, 17, 4], [600]]


@pytest.mark.parametrize("kernel", KERNELS)
def test_block_path_equals_scan_on_hard_cases(kernel):
    # Exact ties everywhere (equal weights), a 1e9 weight ratio, skewed weights.
    rng = np.random.default_rng(1)
    cases = [np.full(40, 1 / 40), np.array([1 - 1e-9] + [1e-9 / 99] * 99), skewed(rng, 800)]
    full = 0
    for w in cases:
        ref = build_blending_indices(w[None], np.array([20000], np.int64), algorithm="scan")
        for lengths in TUNINGS:
            for cap in (8.0, 1e-6):  # 1e-6: margins hit the cap, selections keep everything
                di, dsi, _, stats = _block(w, 20000, lengths, kernel, max_margin=cap)
                np.testing.assert_array_equal(di, ref[0], err_msg=f"lengths={lengths} cap={cap}")
                np.testing.assert_array_equal(dsi, ref[1], err_msg=f"lengths={lengths} cap={cap}")
                assert stats["kernel"] == kernel
                full += sum(stats["level_full"]) if cap < 1 else 0
    assert full > 0  # the keep-everything selections ran


@pytest.mark.parametrize("kernel", KERNELS)
def test_mmbert_decay_weights_identical_to_megatron_under_any_tuning(kernel):
    # The mmBERT decay phase: tau = 0.3 over 1833 languages with realistic (log-normal, spanning
    # ~4 orders of magnitude) token counts.
    rng = np.random.default_rng(1833)
    tokens = rng.lognormal(18, 2.5, 1833)
    w = tokens ** 0.3
    w /= w.sum()
    n = 150_000
    ref = megatron_blend(w, n)
    aborts = np.zeros(5)
    for lengths in TUNINGS:
        di, dsi, _, stats = _block(w, n, lengths, kernel)
        np.testing.assert_array_equal(di, ref[0], err_msg=f"lengths={lengths}")
        np.testing.assert_array_equal(dsi, ref[1], err_msg=f"lengths={lengths}")
        if len(lengths) == 5:
            aborts += stats["level_aborts"]
    assert (aborts > 0).all()  # every level of the deep schedule stopped some blocks early
    # Every prefix, not just the full run: a shorter build is the prefix of the longer one.
    for m in (1, 2, 3, 1833, 1834, 77_777):
        di, dsi, _, _ = _block(w, m, [40, 9, 2], kernel)
        np.testing.assert_array_equal(di, ref[0][:m])
        np.testing.assert_array_equal(dsi, ref[1][:m])


def test_randomised_weights_identical_to_megatron():
    rng = np.random.default_rng(7)
    for trial in range(24):
        L = int(rng.choice([1, 2, 3, 7, 40, 129, 600, 2000]))
        kind = trial % 3
        if kind == 0:
            w = skewed(rng, L)
        elif kind == 1:  # few distinct values: many exact float ties between datasets
            w = rng.integers(1, 4, L).astype(np.float64)
            w /= w.sum()
        else:  # one dominant dataset and a long tail
            w = rng.uniform(0.5, 1.5, L) * 1e-4
            w[rng.integers(L)] = 1.0
            w /= w.sum()
        n = int(rng.integers(1, 40_000))
        lengths = TUNINGS[trial % len(TUNINGS)]
        kernel = KERNELS[trial % len(KERNELS)]
        ref = megatron_blend(w, n)
        di, dsi, _, _ = _block(w, n, lengths, kernel)
        msg = f"L={L} n={n} lengths={lengths} kernel={kernel}"
        np.testing.assert_array_equal(di, ref[0], err_msg=msg)
        np.testing.assert_array_equal(dsi, ref[1], err_msg=msg)


def test_bad_tuning_is_rejected():
    w = np.array([[0.5, 0.5]])
    S, P = np.array([4], np.int64), np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="block_lengths must be positive"):
        ib.build_blending_indices(w, S, P, "fast", 1, [8, 0])
    with pytest.raises(ValueError, match="at most 7 levels"):
        ib.build_blending_indices(w, S, P, "fast", 1, [9, 8, 7, 6, 5, 4, 3, 2])
    for cap in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_margin must be a finite number > 0"):
            ib.build_blending_indices(w, S, P, "fast", 1, [], "auto", cap)
    with pytest.raises(ValueError, match="kernel must be 'auto', 'avx512', 'avx2' or 'generic'"):
        ib.build_blending_indices(w, S, P, "fast", 1, [], "sse")
    for kernel, needs in (("avx512", "AVX-512F"), ("avx2", "AVX2")):
        if kernel not in KERNELS:
            with pytest.raises(ValueError, match=f"needs a CPU with {needs}"):
                ib.build_blending_indices(w, S, P, "fast", 1, [], kernel)
    assert KERNELS[-1] == "generic"
    assert ib.build_blending_indices(w, S, P)[3]["kernel"] == KERNELS[0]  # auto: the fastest


def _prefix_deviation(di, weights, sizes, L):
    """max |count_i(n) - target_i(n)| over prefixes n of one phase (target: cumulative weights)."""
    per_step = np.repeat(weights, sizes, axis=0)  # [N, L]
    target = np.cumsum(per_step, axis=0)
    counts = np.cumsum(np.eye(L, dtype=np.int64)[di.astype(np.int64)], axis=0)
    return np.abs(counts - target).max()


def test_prefix_bound_multiphase_and_annealed():
    rng = np.random.default_rng(2)
    L = 40
    base = rng.lognormal(0, 2, L)
    weights, sizes, phase = [], [], []
    # phase 0: fixed; phase 1: 8 annealed segments over 30 languages; phase 2: 5 languages only.
    w0 = base ** 0.7
    weights.append(w0 / w0.sum()); sizes.append(3000); phase.append(0)
    act = np.zeros(L, bool); act[:30] = True
    for k in range(8):
        t = 0.7 - 0.4 * (k + 0.5) / 8
        w = np.where(act, base ** t, 0.0); weights.append(w / w.sum()); sizes.append(int(rng.integers(1, 900))); phase.append(1)
    w2 = np.zeros(L); w2[[3, 7, 11, 20, 39]] = rng.uniform(0.1, 1, 5)
    weights.append(w2 / w2.sum()); sizes.append(2500); phase.append(2)
    W = np.array(weights); S = np.array(sizes, np.int64); P = np.array(phase, np.int64)
    di_scan, dsi_scan, _ = build_blending_indices(W, S, P, algorithm="scan")
    for lengths in TUNINGS:  # block path forced, every kernel, several tunings
        for kernel in KERNELS:
            di, dsi, counts, _ = _block(W, 0, lengths, kernel, phases=P, sizes=S)
            np.testing.assert_array_equal(di, di_scan, err_msg=f"lengths={lengths} kernel={kernel}")
            np.testing.assert_array_equal(dsi, dsi_scan, err_msg=f"lengths={lengths} kernel={kernel}")
    start = 0
    for p in range(3):
        sel = P == p
        n = int(S[sel].sum())
        d = di[start:start + n]
        assert _prefix_deviation(d, W[sel], S[sel], L) <= 1.0
        inactive = ~(W[sel] > 0).any(0)
        assert not np.isin(np.flatnonzero(inactive), d).any()  # inactive languages never appear
        assert counts[p].sum() == n
        start += n
    # dataset_sample_index counts on across phases: each language's rows are read in order, once.
    for i in range(L):
        np.testing.assert_array_equal(dsi[di == i], np.arange((di == i).sum()))


def test_large_L_uses_int32():
    w = np.full(33000, 1 / 33000)
    di, dsi, _ = build_blending_indices(w[None], np.array([34000], np.int64))
    assert di.dtype == np.int32 and di.max() >= 32767
    assert np.bincount(di).max() <= 2


def test_dtype_errors():
    w = np.array([[0.5, 0.5]])
    with pytest.raises(TypeError, match="weights must have dtype float64"):
        ib.build_blending_indices(w.astype(np.float32), np.array([4], np.int64), np.zeros(1, np.int64))
    with pytest.raises(TypeError, match="segment_sizes must have dtype int64"):
        ib.build_blending_indices(w, np.array([4], np.int32), np.zeros(1, np.int64))
    with pytest.raises(TypeError, match="sizes must have dtype int32"):
        ib.pack_rows(np.array([3, 4], np.int64), 4, 1, 0, 0, 0)
    with pytest.raises(TypeError, match="must be a numpy array"):
        ib.pack_rows([3, 4], 4, 1, 0, 0, 0)
    with pytest.raises(TypeError):
        build_blending_indices(w, np.array([4]).astype(np.uint64))
    with pytest.raises(ValueError, match="no dataset with a positive weight"):
        build_blending_indices(np.zeros((1, 2)), np.array([4], np.int64))
    with pytest.raises(ValueError, match="finite"):
        build_blending_indices(np.array([[np.nan, 1.0]]), np.array([4], np.int64))


def _numpy_pcg64(seed, stream, epoch):
    state, inc = ib.pcg64_state(seed, stream, epoch)
    bg = np.random.PCG64()
    bg.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}
    return bg


def test_pcg64_and_permutation_match_numpy():
    for seed, stream, epoch in [(0, 0, 0), (21, 12345, 7), (2**63, 5, 2**40)]:
        raw = _numpy_pcg64(seed, stream, epoch).random_raw(50).astype(np.uint64)
        np.testing.assert_array_equal(raw, ib.pcg64_random_raw(seed, stream, epoch, 50).view(np.uint64))
        for n in (1, 2, 3, 10, 1000, 70000):
            ref = np.random.Generator(_numpy_pcg64(seed, stream, epoch)).permutation(n)
            np.testing.assert_array_equal(ib.permutation(n, seed, stream, epoch), ref)
    assert not np.array_equal(ib.permutation(100, 1, 0, 0), ib.permutation(100, 1, 0, 1))


def _stream(sizes, doc_index, sample_idx):
    """Rows as (doc, start, end) pieces and the concatenated (doc, token) stream they cover."""
    rows = []
    for r in range(len(sample_idx) - 1):
        (p0, o0), (p1, o1) = sample_idx[r], sample_idx[r + 1]
        pieces, p, o = [], p0, o0
        while p < p1 or (p == p1 and o < o1):
            end = o1 if p == p1 else sizes[doc_index[p]]
            if end > o:
                pieces.append((doc_index[p], o, end))
            p, o = p + 1, 0
        rows.append(pieces)
    return rows


def test_pack_rows_matches_megatron_and_covers_every_token():
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 40, 200).astype(np.int32)
    sizes[5] = 500  # a document longer than several rows
    tpe = int(sizes.sum())
    for seq in (8, 64, 333):
        rows = (3 * tpe) // seq
        doc_index, sample_idx, first = pack_rows(sizes, seq, rows, 0, 11, 2)
        assert first == 0 and doc_index.dtype == np.int32 and sample_idx.dtype == np.int64
        ref = build_sample_idx(sizes, doc_index, seq, 3, tpe, True, False)
        np.testing.assert_array_equal(sample_idx, ref[: rows + 1])
        for e in range(3):  # each epoch is a permutation from the documented generator
            np.testing.assert_array_equal(doc_index[e * 200:(e + 1) * 200], ib.permutation(200, 11, 2, e))
        pieces = _stream(sizes, doc_index, sample_idx)
        assert all(sum(b - a for _, a, b in row) == seq for row in pieces)  # rows are full
        # The rows, read back to back, are exactly the epochs' documents in shuffled order: every
        # token of every document once per epoch, documents split only at row boundaries.
        got = np.concatenate([np.stack([np.full(b - a, d), np.arange(a, b)], 1) for row in pieces for d, a, b in row])
        expected = np.concatenate(
            [np.stack([np.full(sizes[d], d), np.arange(sizes[d])], 1) for d in doc_index if sizes[d]]
        )[: rows * seq]
        np.testing.assert_array_equal(got, expected)
        for r, row in enumerate(pieces):  # a piece is a whole document unless at a row edge
            for j, (d, a, b) in enumerate(row):
                if 0 < j < len(row) - 1:
                    assert (a, b) == (0, sizes[d])
    # deterministic, and chaining by start_token continues the same stream
    a = pack_rows(sizes, 64, 100, 0, 11, 2)
    b = pack_rows(sizes, 64, 40, 0, 11, 2)
    c = pack_rows(sizes, 64, 60, 40 * 64, 11, 2)
    np.testing.assert_array_equal(a[1], pack_rows(sizes, 64, 100, 0, 11, 2)[1])
    np.testing.assert_array_equal(b[1], a[1][:41])
    first_c = c[2]
    assert first_c == (40 * 64) // tpe
    shift = (first_c - a[2]) * len(sizes)
    np.testing.assert_array_equal(c[1][:, 0] + shift, a[1][40:, 0])
    np.testing.assert_array_equal(c[1][:, 1], a[1][40:, 1])


def test_pack_rows_errors():
    with pytest.raises(ValueError, match="no tokens"):
        pack_rows(np.zeros(3, np.int32), 4, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows(np.ones(3, np.int32), 0, 1, 0, 0, 0)


PHASES = [
    PhaseConfig(name="p", tokens=6000, seq_len=32, temperature=0.5),
    PhaseConfig(name="q", tokens=6000, seq_len=64, temperature=0.3, temperature_end=0.2, languages=["l0", "l2"]),
]


def test_cache_hit_miss_and_key(tmp_path, capsys):
    path, _ = write_corpus(str(tmp_path / "corpus"), [30, 10, 3])
    manifest = load_manifest(path)
    cache = str(tmp_path / "cache")
    first = build_data_index(manifest, PHASES, seed=1, cache_dir=cache)
    assert "cache miss" in capsys.readouterr().err
    again = build_data_index(manifest, PHASES, seed=1, cache_dir=cache)
    assert "cache miss" not in capsys.readouterr().err and again.path == first.path
    for a, b in zip(first.phases, again.phases):
        np.testing.assert_array_equal(a.dataset_index, b.dataset_index)
        np.testing.assert_array_equal(a.sample_idx, b.sample_idx)
    in_memory = build_data_index(manifest, PHASES, seed=1, cache_dir=None)
    np.testing.assert_array_equal(in_memory.phases[1].doc_index, first.phases[1].doc_index)
    other_seed = build_data_index(manifest, PHASES, seed=2, cache_dir=cache)
    assert other_seed.path != first.path
    assert "cache miss" in capsys.readouterr().err
    assert sorted(os.listdir(cache)) == sorted({os.path.basename(first.path), os.path.basename(other_seed.path)})
    # phase q's inactive language never appears
    assert not (np.asarray(first.phases[1].dataset_index) == 1).any()


def test_waiting_rank_times_out_with_clear_message(tmp_path):
    path, _ = write_corpus(str(tmp_path / "corpus"), [5, 5])
    manifest = load_manifest(path)
    t0 = time.time()
    with pytest.raises(TimeoutError, match="tools/build_data_index.py") as e:
        build_data_index(manifest, PHASES[:1], seed=1, cache_dir=str(tmp_path / "c"), is_builder=False,
                         timeout=0.3, poll_interval=0.05)
    assert str(tmp_path / "c") in str(e.value) and time.time() - t0 < 5
    # Every flag it names is one of the tool's (the one grammar: the YAML key), none deprecated.
    import re

    from megatron_mmbert.cli.build_data_index import build_parser

    ap, spec = build_parser()
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w.]*", str(e.value))) - {"--a.b"}
    assert {"--config", "--manifest", "--cache_dir", "--seed", "--packing"} <= flags
    current = {o.flag for o in spec.options if not o.deprecated} | {"--config"}
    assert flags <= current, flags - current


def test_cache_folder_published_once(tmp_path, capsys):
    """The builder publishes its folder whole (fileio.publish_new_directory); one that lost the race to
    an identical folder removes its own and leaves the winner's untouched. The build reports its
    progress (rate, ETA) through progress.Progress."""
    from megatron_mmbert.fileio import publish_new_directory

    path, _ = write_corpus(str(tmp_path / "corpus"), [8, 4])
    index = build_data_index(load_manifest(path), PHASES[:1], seed=1, cache_dir=str(tmp_path / "c"))
    err = capsys.readouterr().err
    assert "samples/s" in err and "languages/s" in err and "ETA" in err
    before = {f: os.path.getmtime(os.path.join(index.path, f)) for f in os.listdir(index.path)}
    late = tmp_path / "c" / ".late-builder"
    late.mkdir()
    (late / "index_plan.json").write_text("{}")
    assert publish_new_directory(str(late), index.path) is False
    assert not late.exists()
    assert {f: os.path.getmtime(os.path.join(index.path, f)) for f in os.listdir(index.path)} == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "a").write_text("x")
    assert publish_new_directory(str(fresh), str(tmp_path / "published")) is True
    assert (tmp_path / "published" / "a").read_text() == "x" and not fresh.exists()


@pytest.mark.slow
def test_waiting_rank_picks_up_the_builders_result(tmp_path):
    path, _ = write_corpus(str(tmp_path / "corpus"), [8, 4])
    cache = str(tmp_path / "c")
    code = (
        "import sys, time; sys.path.insert(0, %r); time.sleep(0.5)\n"
        "from megatron_mmbert.config import PhaseConfig\n"
        "from megatron_mmbert.data.index import build_data_index\n"
        "from megatron_mmbert.data.shards import load_manifest\n"
        "build_data_index(load_manifest(%r), [PhaseConfig(name='p', tokens=6000, seq_len=32, temperature=0.5)],"
        " seed=1, cache_dir=%r, is_builder=True)\n"
    ) % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path, cache)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        idx = build_data_index(load_manifest(path), PHASES[:1], seed=1, cache_dir=cache, is_builder=False,
                               timeout=120, poll_interval=0.05)
    finally:
        assert proc.wait(timeout=120) == 0
    assert idx.path.startswith(cache) and len(idx.phases[0].dataset_index) == 188


def test_epoch_cap_in_the_plan_and_phase_epochs(tmp_path):
    """max_epochs_per_language (UniMax): no language passes the cap within the phase, the surplus
    goes to the others (every row is placed); phase_epochs reports it from the plan."""
    from megatron_mmbert.data.index import format_index_plan, phase_epochs

    manifest, _ = write_corpus(str(tmp_path), [60, 25, 8, 3])
    phases = [PhaseConfig(name="p", tokens=64 * 40, seq_len=64, temperature=0.3, max_epochs_per_language=1.5)]
    index = build_data_index(load_manifest(manifest), phases, seed=1, cache_dir=None)
    within = phase_epochs(index.plan, "p")
    uncapped = build_data_index(load_manifest(manifest), [PhaseConfig(name="p", tokens=64 * 40, seq_len=64,
                                                                        temperature=0.3)], seed=1, cache_dir=None)
    assert max(e["in_phase"] for e in phase_epochs(uncapped.plan, "p").values()) > 1.6  # the cap has work
    assert max(e["in_phase"] for e in within.values()) <= 1.5 + 64 / min(index.plan["language_tokens"].values())
    assert sum(r["rows"] for r in index.plan["phases"][0]["languages"].values()) == 40
    assert "epochs within the phase: max" in format_index_plan(index.plan)


# -- data.packing: best_fit ------------------------------------------------------------------------

BF_PHASES = [
    PhaseConfig(name="p", tokens=64 * 120, seq_len=64, temperature=0.5),
    PhaseConfig(name="q", tokens=128 * 40, seq_len=128, temperature=0.3, languages=["l0", "l1"]),
]


def _bf_corpus(tmp_path):
    # documents of 3..151 tokens framed <bos> ... <eos>: some longer than seq_len 64 and 128
    return write_corpus(str(tmp_path / "corpus"), [60, 25, 8], max_len=150)


def _framed(texts, name, d, a, b, flags):
    """A piece as the reader builds it: <bos> if flags & 1, stored tokens [a, b), <eos> if flags & 2."""
    return np.concatenate([[SPECIAL["bos"]] if flags & 1 else [], texts[name][d][a:b],
                           [SPECIAL["eos"]] if flags & 2 else []]).astype(np.int64)


@pytest.mark.parametrize("bin_rows", [None, [4, 2]], ids=["seq_len_rows", "micro_batch_rows"])
def test_best_fit_rows_are_whole_framed_pieces(tmp_path, bin_rows):
    """Every piece is <bos> content <eos> (content at most seq_len - 2, non-first pieces >= 32
    content tokens), packed whole into packed rows of bin_rows x seq_len tokens whose seq_len slices
    are the sample rows; the plan's statistics are those of the rows read back."""
    from megatron_mmbert.data.mlm import MLMStream

    path, texts = _bf_corpus(tmp_path)
    stream = MLMStream(path, BF_PHASES, seed=3, cache_dir=None, packing="best_fit", bin_rows=bin_rows)
    bos, eos, pad_id = SPECIAL["bos"], SPECIAL["eos"], stream.pad_id
    for k, phase in enumerate(BF_PHASES):
        p = stream.index.phases[k]
        seq, g = phase.seq_len, (bin_rows or [1, 1])[k]
        assert p.bin_rows == g
        segments = pad = fragment = total = 0
        n_rows = phase.tokens // seq
        for i in range(0, n_rows, g):  # one packed row: g consecutive samples of one language
            lang = int(p.dataset_index[i])
            name = stream.index.languages[lang]
            r0 = int(p.dataset_sample_index[i])
            assert r0 % g == 0 and list(p.dataset_index[i:i + g]) == [lang] * g
            assert list(p.dataset_sample_index[i:i + g]) == list(range(r0, r0 + g))
            pieces = p.packed_row_pieces(lang, r0 // g)
            expected = [_framed(texts, name, *piece) for piece in pieces]
            body = np.concatenate(expected)
            expected_row = np.concatenate([body, np.full(g * seq - len(body), pad_id)])
            rows = [stream.row_with_padding(k, j) for j in range(i, i + g)]
            np.testing.assert_array_equal(np.concatenate([t for t, *_ in rows]), expected_row)
            assert sum(r[3] for r in rows) == g * seq - len(body)
            for (d, a, b, f), toks in zip(pieces, expected):
                doc = texts[name][d]
                segments += 1
                assert toks[0] == bos and toks[-1] == eos and 3 <= len(toks) <= seq
                assert a == 0 or len(toks) - 2 >= 32  # non-first pieces under 32 content tokens are dropped
                if len(doc) <= seq:  # documents that fit a row are never split
                    assert a == 0 and b == len(doc) and f == 0
                else:
                    fragment += len(toks)
            pad += g * seq - len(body)
            total += g * seq
            # the micro-batch: one cu_seqlens segment per piece, positions from 0 at each <bos>
            batch = stream.batch(k, range(i, i + g))
            cu = batch["cu_seqlens"].tolist()
            lengths = [len(t) for t in expected] + ([g * seq - len(body)] if len(body) < g * seq else [])
            assert cu == list(np.concatenate([[0], np.cumsum(lengths)]))
            positions = batch["positions"].reshape(-1).numpy()
            np.testing.assert_array_equal(positions, np.concatenate([np.arange(n) for n in lengths]))
        plan = stream.index.plan["phases"][k]["packing"]
        assert plan["mode"] == "best_fit" and plan["bos_start_fraction"] == 1.0 and plan["eos_end_fraction"] == 1.0
        assert plan["rows_per_packed_row"] == g and plan["packed_row_tokens"] == g * seq
        assert plan["segments"] == segments
        assert plan["pad_fraction"] == round(pad / total, 6)
        assert plan["fragment_token_fraction"] == round(fragment / (total - pad), 6)
        assert 0 < plan["pad_fraction"] < 0.2  # padding only where no piece fits


def test_best_fit_rows_of_a_sample_list_keep_their_slices(tmp_path):
    """Rows that do not make up a packed row (any sample list): a piece that runs on from the previous
    row is its own segment, its positions continuing; rows are the same tokens either way."""
    from megatron_mmbert.data.mlm import MLMStream

    path, _ = _bf_corpus(tmp_path)
    stream = MLMStream(path, BF_PHASES, seed=3, cache_dir=None, packing="best_fit", bin_rows=[4, 2])
    whole = stream.batch("p", range(0, 4))
    rows = [stream.batch("p", [j]) for j in range(4)]
    np.testing.assert_array_equal(whole["tokens"], torch.cat([r["tokens"] for r in rows]))
    np.testing.assert_array_equal(whole["positions"], torch.cat([r["positions"] for r in rows]))
    continued = [r for r in rows if r["positions"][0, 0] > 0]
    assert continued, "no piece crosses a row in this corpus: the test needs one"
    assert len(whole["cu_seqlens"]) < sum(len(r["cu_seqlens"]) - 1 for r in rows) + 1


def test_best_fit_framing_uses_the_shards_own_bos_and_eos(tmp_path):
    """Documents whose shards hold <bos>/<eos> keep them; documents stored bare get them added."""
    from megatron_mmbert.data.index import FRAMING_BOS, FRAMING_EOS, framing_flags, pack_best_fit

    path, texts = _bf_corpus(tmp_path)
    manifest = load_manifest(path)
    flags = framing_flags(manifest, "l0")
    assert (flags == FRAMING_BOS | FRAMING_EOS).all()
    sizes = np.array([len(d) for d in texts["l0"]], np.int32)
    for stored in (flags, np.zeros_like(flags)):  # framed in the shards, or bare (content = all)
        pieces, pflags, ptr, _, st = pack_best_fit(sizes, stored, 64, 6, 0, 5, 1, bin_rows=4)
        content = (sizes - 2) if stored[0] else sizes
        for (d, a, n), f in zip(pieces.tolist(), pflags.tolist()):
            total = n + (f & 1) + (f >> 1)
            assert total <= 64 and (a > 0 or f & 1 == (0 if stored[0] else 1))
        assert st["bos_segments"] == st["eos_segments"] == st["segments"] == len(pieces)
        assert st["row_tokens"] == 6 * 4 * 64 and len(ptr) == 7
        assert content.min() >= 1


def _count_framing_reads(monkeypatch):
    """Documents whose first and last token the index reads from the .bin: by the scan (a wrapper of
    documents._first_and_last_tokens) and by the framing record's sample (of framing_record._read_framing)."""
    from megatron_mmbert.data.index import documents, framing_record

    read = {"scan": 0, "sample": 0}
    scan, sample = documents._first_and_last_tokens, framing_record._read_framing

    def scanning(prefix, ds, docs):
        read["scan"] += len(docs) - 1
        return scan(prefix, ds, docs)

    def sampling(prefix, local):
        read["sample"] += len(local)
        return sample(prefix, local)

    monkeypatch.setattr(documents, "_first_and_last_tokens", scanning)
    monkeypatch.setattr(framing_record, "_read_framing", sampling)
    return read


def test_index_from_the_framing_record_equals_the_scan_and_skips_it(tmp_path, monkeypatch):
    """A manifest recording its languages' framing (as preprocessing writes it): the flags and the
    best_fit index equal the scan's (the recorded digests), reading only the sample's documents."""
    from megatron_mmbert.data.index import framing_flags, framing_record

    monkeypatch.setattr(framing_record, "SAMPLE_DOCUMENTS", 5)
    read = _count_framing_reads(monkeypatch)
    path, _ = write_corpus(str(tmp_path / "corpus"), [70, 25, 9, 0], max_len=150, shards_per_lang=2,
                           record_framing=True)
    recorded = load_manifest(path)
    scanned = load_manifest(path)
    for entry in scanned.languages.values():
        entry.framing = None
    for lang, entry in recorded.languages.items():
        if not entry.documents:  # megatron-core cannot open an empty shard; the build never asks
            continue
        read.update(scan=0, sample=0)
        expected = framing_flags(scanned, lang)
        assert read == {"scan": entry.documents, "sample": 0}  # the scan reads every document
        read.update(scan=0, sample=0)
        np.testing.assert_array_equal(framing_flags(recorded, lang), expected)
        assert read["scan"] == 0 and 0 < read["sample"] <= min(entry.documents, 5 + 2 * len(entry.shards)), lang
    assert (expected == 3).all() and len(framing_flags(recorded, "l0")) == 70
    read.update(scan=0, sample=0)
    for name, bin_rows in (("best_fit", None), ("best_fit_micro_batch", DIGEST_BIN_ROWS)):
        for start in (0, 2):
            index = build_data_index(recorded, DIGEST_PHASES, seed=7, cache_dir=None, packing="best_fit",
                                     start_phase=start, bin_rows=bin_rows)
            assert _index_digest(index) == RECORDED_DIGESTS[f"{name}/start{start}"], (name, start)
    assert read["scan"] == 0 and read["sample"] > 0


def test_the_samples_reader_reads_as_the_scan(tmp_path):
    """framing_record._read_framing (pread, scattered documents) gives the scan's first and last tokens
    (documents._first_and_last_tokens) on documents of several sequences, empty ones included."""
    from megatron_mmbert.data.index import documents, framing_record
    from megatron_mmbert.data.shards import ShardWriter
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(3)
    prefix = str(tmp_path / "s" / "part-0")
    with ShardWriter(prefix, np.int32) as w:
        for _ in range(200):
            seqs = [rng.integers(0, 9, size=int(rng.integers(0, 4))) for _ in range(int(rng.integers(1, 4)))]
            w.add_document(np.concatenate(seqs), [len(q) for q in seqs])
        w.finalize()
    ds = IndexedDataset(prefix)
    first, last = documents._first_and_last_tokens(prefix, ds, np.asarray(ds.document_indices, np.int64))
    assert (first == -1).any() and (last == -1).any()
    local = np.unique(rng.integers(0, 200, 60))
    f, l_ = framing_record._read_framing(prefix, local)
    np.testing.assert_array_equal(f, first[local])
    np.testing.assert_array_equal(l_, last[local])


def test_a_framing_record_that_disagrees_with_the_shards_is_refused(tmp_path):
    """A record the shards contradict (a lie, or a shard replaced in place) is refused naming the
    language, the shard and the fix; a record of mixed framing, or of other ids, falls back to the scan."""
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.data.index import framing_flags

    path, _ = write_corpus(str(tmp_path / "corpus"), [30, 4], shards_per_lang=2, record_framing=True)
    m = load_manifest(path)
    m.languages["l0"].framing.ends_eos = 0  # says no document ends with <eos>
    with pytest.raises(ConfigError, match=r"language l0: shard .*l0/part-00000 document 0 .*delete the "
                                          r"\"framing\" record of l0"):
        framing_flags(m, "l0")
    m = load_manifest(path)
    m.languages["l1"].documents = 5  # the shards hold 4: one was replaced
    m.languages["l1"].framing.starts_bos = m.languages["l1"].framing.ends_eos = 5
    with pytest.raises(ConfigError, match="language l1: the manifest records 5 documents .* shards hold 4"):
        framing_flags(m, "l1")
    # A shard rewritten in place without <bos>: the sample reads its first document.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    m = load_manifest(path)
    prefix = m.languages["l1"].shards[1]
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(2):
        b.add_document(np.array([7, 8, SPECIAL["eos"]], np.int32), [3])
    b.finalize(prefix + ".idx")
    with pytest.raises(ConfigError, match=f"language l1: shard {prefix} document 0 starts with token 7"):
        framing_flags(m, "l1")
    m.languages["l1"].framing.starts_bos = 2  # mixed: only the scan knows which documents
    flags = framing_flags(m, "l1")
    assert flags.tolist() == [3, 3, 2, 2]
    m.languages["l1"].framing.starts_bos = 4
    m.languages["l1"].framing.bos = 9  # counted another id than the tokenizer's <bos>: not used
    assert framing_flags(m, "l1").tolist() == [3, 3, 2, 2]


def test_best_fit_frames_pieces_as_the_reference():
    """The oracle's framing (tests/helpers/reference_packer.py): every document becomes the reference's
    sequences, <bos> content <eos> with content cut every seq_len - 2 tokens and non-first pieces
    under 32 content tokens dropped; here, every piece placed is one of them (bare documents: the
    stored tokens are the content), and every document whose pieces are all placed has them all."""
    from collections import defaultdict

    from megatron_mmbert.data.index import pack_best_fit
    from tests.helpers.reference_packer import reference_pieces

    rng = np.random.default_rng(1)
    content = np.maximum(1, rng.lognormal(np.log(150), 1.3, 3000)).astype(np.int32)
    for seq in (64, 130):
        pieces, flags, _, _, st = pack_best_fit(content, np.zeros(len(content), np.int8), seq, 40, 0, 1, 2,
                                                bin_rows=4)
        assert (flags == 3).all()  # bare documents: <bos> and <eos> added to every piece
        placed = defaultdict(set)
        for d, a, n in pieces.tolist():
            placed[d].add((a, n + 2))
        complete = 0
        for d, got in placed.items():
            ref = set(reference_pieces(int(content[d]), seq))
            assert got <= ref, (d, sorted(got), sorted(ref))
            complete += got == ref
        assert complete >= 0.95 * len(placed)  # only the last window's pending pieces are missing


def test_best_fit_pads_no_more_than_the_reference_loop(tmp_path):
    """The named oracle (tests/helpers/reference_packer.py, bert24's loop): on the same framed
    sequences and the reference's geometry (packed rows of micro_batch x seq_len), this packer's
    padding is at most the reference's plus 0.02 percentage point and within the goals (0.1% at seq 1024,
    0.5% at 8192); rows of seq_len pad far more."""
    from megatron_mmbert.data.index import pack_best_fit
    from tests.helpers.reference_packer import reference_padding, reference_sequences

    rng = np.random.default_rng(0)
    content = np.maximum(1, rng.lognormal(np.log(400), 1.1, 30000)).astype(np.int32)
    for seq, mbs, batch, goal in ((1024, 48, 576, 1e-3), (8192, 6, 72, 5e-3)):  # 12 packed rows a batch
        bins = 48
        _, _, _, _, st = pack_best_fit(content, np.zeros(len(content), np.int8), seq, bins, 0, 1, 2, bin_rows=mbs)
        ours = st["pad_tokens"] / st["row_tokens"]
        # the same documents in the same order: this packer's stream is permutation(D, seed=1, stream=2, epoch 0)
        order = ib.permutation(len(content), 1, 2, 0)
        lengths = list(reference_sequences(content[order].tolist(), seq))
        ref = reference_padding(lengths, batch, mbs, seq, num_batches=bins // (batch // mbs))
        assert ours <= ref + 2e-4 and ours <= goal, (seq, ours, ref)
        _, _, _, _, rows = pack_best_fit(content, np.zeros(len(content), np.int8), seq, bins * mbs, 0, 1, 2)
        assert rows["pad_tokens"] / rows["row_tokens"] > 5 * max(ours, 1e-4)


def test_best_fit_rows_are_bit_identical_across_reruns(tmp_path):
    path, _ = _bf_corpus(tmp_path)
    manifest = load_manifest(path)
    a = build_data_index(manifest, BF_PHASES, seed=5, cache_dir=str(tmp_path / "c"), packing="best_fit")
    b = build_data_index(manifest, BF_PHASES, seed=5, cache_dir=None, packing="best_fit")
    c = build_data_index(manifest, BF_PHASES, seed=6, cache_dir=None, packing="best_fit")
    concat = build_data_index(manifest, BF_PHASES, seed=5, cache_dir=str(tmp_path / "c"))
    assert a.path != concat.path  # the mode is part of the cache key
    for name in ("pieces", "piece_flags", "piece_offsets", "row_ptr", "row_offsets", "dataset_index"):
        for pa, pb in zip(a.phases, b.phases):
            np.testing.assert_array_equal(np.asarray(getattr(pa, name)), getattr(pb, name))
    assert not np.array_equal(np.asarray(a.phases[0].pieces), c.phases[0].pieces)
    assert a.plan["phases"] == b.plan["phases"]


def test_best_fit_stream_positions_and_branch(tmp_path):
    """Stream positions are the documents the packer took; a branch starting at phase q packs the
    same rows from there."""
    from megatron_mmbert.data.index import document_lengths, language_stream, pack_best_fit, phase_end_positions

    path, _ = _bf_corpus(tmp_path)
    manifest = load_manifest(path)
    full = build_data_index(manifest, BF_PHASES, seed=5, cache_dir=None, packing="best_fit")
    branch = build_data_index(manifest, BF_PHASES, seed=5, cache_dir=None, packing="best_fit", start_phase=1)
    for name in ("pieces", "piece_flags", "row_ptr", "dataset_sample_index"):
        np.testing.assert_array_equal(full.phases[1].__dict__[name], branch.phases[1].__dict__[name])
    assert branch.plan["phases"][1]["languages"] == full.plan["phases"][1]["languages"]
    ends = phase_end_positions(full.plan, "p")
    assert ends == {lang: r["first_token"] for lang, r in full.plan["phases"][1]["languages"].items()}
    # the end of phase p is the packer's end_token: the tokens of the documents it took
    sizes = document_lengths(manifest.languages["l0"].shards)
    rows = int(full.phases[0].counts[0])
    *_, end, stats = pack_best_fit(sizes, np.full(len(sizes), 3, np.int8), 64, rows, 0, 5, language_stream("l0"))
    assert end == ends["l0"] and stats["documents"] > 0 and end != rows * 64
    with pytest.raises(ValueError, match="document boundary"):
        pack_best_fit(sizes, np.full(len(sizes), 3, np.int8), 64, 1, 1, 5, 1)  # documents have >= 3 tokens


def test_packing_stats_concat_vs_best_fit(tmp_path):
    """The measured numbers: concat rows start mid-document (no <bos>), best_fit rows do not."""
    path, _ = _bf_corpus(tmp_path)
    manifest = load_manifest(path)
    phases = [PhaseConfig(name="p", tokens=32 * 200, seq_len=32, temperature=0.5)]
    from megatron_mmbert.data.index import format_index_plan

    concat = build_data_index(manifest, phases, seed=5, cache_dir=None).plan["phases"][0]["packing"]
    plan = build_data_index(manifest, phases, seed=5, cache_dir=None, packing="best_fit").plan
    best = plan["phases"][0]["packing"]
    assert "packing best_fit: padding " in format_index_plan(plan) and plan["packing"] == "best_fit"
    assert concat["mode"] == "concat" and concat["pad_fraction"] == 0.0
    assert concat["bos_start_fraction"] < 0.7 and best["bos_start_fraction"] == 1.0
    assert best["fragment_token_fraction"] < concat["fragment_token_fraction"]
    with pytest.raises(ValueError, match="data.packing"):
        build_data_index(manifest, phases, seed=5, cache_dir=None, packing="greedy")


def test_build_data_index_cli_packing(tmp_path, capsys):
    """A phase list takes --packing; the index folder and its plan say best_fit."""
    import json

    import yaml

    from megatron_mmbert.cli.build_data_index import main

    path, _ = _bf_corpus(tmp_path)
    phases = tmp_path / "phases.yaml"
    phases.write_text(yaml.safe_dump([{"name": "p", "tokens": 64 * 20, "seq_len": 64, "temperature": 0.5}]))
    args = ["--config", str(phases), "--manifest", path, "--cache-dir", str(tmp_path / "c"), "--seed", "1"]
    assert main(args + ["--packing", "best_fit", "--threads", "2"]) == 0  # issue 29: a field, so a flag
    out = capsys.readouterr().out
    assert "packing best_fit: padding" in out and "(packed rows of 1 x 64 = 64 tokens)" in out
    folder = out.split("index ready in ", 1)[1].split(" (", 1)[0]
    assert json.load(open(os.path.join(folder, "index_plan.json")))["phases"][0]["packing"]["mode"] == "best_fit"
    assert main(args) == 0 and "packing concat: padding 0.00%" in capsys.readouterr().out


# Digests of the index arrays (values as int64, with shapes) and the plan of a tiny three-phase run,
# recorded with the in-memory builder (build every array, then concatenate) before the build was
# made to stream phase by phase and language by language into the .npy files: the streamed build
# (cached or in memory, whole schedule or a branch) must produce the same values. The concat digests
# are still those recorded then. The best_fit ones were re-recorded when best_fit changed by design
# (issue 26: <bos> ... <eos> framing with content seq_len - 2, the 32-token rule on content, a
# deferral buffer of 5120 pieces, windows reading ahead up to half the room of the rows after them)
# and the packed rows of micro_batch x seq_len were added: from the
# builder of that commit, cached and in memory, whole schedule and branch alike.
DIGEST_PHASES = [
    PhaseConfig(name="p", tokens=64 * 150, seq_len=64, temperature=0.5),
    PhaseConfig(name="q", tokens=128 * 40, seq_len=128, temperature=0.3, languages=["l0", "l2"]),
    PhaseConfig(name="r", tokens=32 * 90, seq_len=32, temperature=0.7),
]
DIGEST_ARRAYS = ("dataset_index", "dataset_sample_index", "counts", "doc_index", "doc_offsets", "sample_idx",
                 "row_offsets", "pieces", "piece_flags", "piece_offsets", "row_ptr", "first_token")
DIGEST_LABELS = {"piece_flags": "piece_bos"}
"""Arrays hashed under the name they had when the concat digests were recorded (``piece_flags`` was
``piece_bos`` then: empty for concat either way)."""
DIGEST_BIN_ROWS = [2, 4, 3]
"""``seq_len`` rows per best_fit packed row of the digest phases (their micro-batch sizes)."""
RECORDED_DIGESTS = {
    "concat/start0": "83422294314c12c781cd5f55a3294bd369beba852ff386712448f10df98f191b",
    "concat/start2": "fd5e9c9f8e1259a921de5441489268f788c41987cefe0d9f8395af1b99b6474b",
    "best_fit/start0": "af8e95a4b0aed11ea65857502492589974a77a0a6028f6deecc215672987d7d6",
    "best_fit/start2": "72447762a93e8ed6453459254cc19fe4e30cf8e159298d5117facd01ac47b877",
    "best_fit_micro_batch/start0": "9948d6207fad12d38560d4d63ee307bffcab386bf78382939fb0bd0836c3ce0d",
    "best_fit_micro_batch/start2": "83a6d9cd901d5cd3987e5d3bc304f61a300c1b883df95d4fd1e79fbe64eee081",
}


def _index_digest(index):
    import hashlib
    import json

    h = hashlib.sha256()
    for p in index.phases:
        for name in DIGEST_ARRAYS:
            a = np.ascontiguousarray(np.asarray(getattr(p, name)), dtype=np.int64)
            h.update(f"{DIGEST_LABELS.get(name, name)}{a.shape}".encode())
            h.update(a.tobytes())
    h.update(json.dumps(index.plan["phases"], sort_keys=True).encode())
    return h.hexdigest()


def _digest_runs(tmp_path):
    path, _ = write_corpus(str(tmp_path / "corpus"), [70, 25, 9, 0], max_len=150, shards_per_lang=2)
    manifest = load_manifest(path)
    for name, packing, bin_rows in (("concat", "concat", None), ("best_fit", "best_fit", None),
                                    ("best_fit_micro_batch", "best_fit", DIGEST_BIN_ROWS)):
        for start in (0, 2):
            for cache in (None, str(tmp_path / "cache")):
                index = build_data_index(manifest, DIGEST_PHASES, seed=7, cache_dir=cache, packing=packing,
                                         start_phase=start, bin_rows=bin_rows)
                yield f"{name}/start{start}", cache is not None, index


def test_streamed_build_matches_the_recorded_in_memory_build(tmp_path):
    seen = set()
    for name, cached, index in _digest_runs(tmp_path):
        assert _index_digest(index) == RECORDED_DIGESTS[name], (name, "cached" if cached else "in memory")
        seen.add(name)
    assert seen == set(RECORDED_DIGESTS)


@pytest.mark.parametrize("schedule,spill_memory", [("longest_first", 0), ("reversed", 0), ("reversed", 700)])
def test_index_built_in_small_blocks_on_threads_matches_the_recorded_digests(tmp_path, monkeypatch, schedule,
                                                                            spill_memory):
    """Issue 29: blending a few samples at a time (segments cut mid-way), packers resumed every row
    (concat) or every window (best_fit), languages on worker threads through their spill files copied
    a few rows at a time: the recorded digests, and nothing left behind in the cache folder. (One
    thread, which appends straight to the phase files, is the other digest test's path.) The order
    languages start in changes nothing: longest first (the builder's) or its reverse (the later
    languages wait in their spill folders for the first). ``spill_memory``: the bytes finished blocks may
    wait in memory (pack.SPILL_MEMORY_BYTES): none (every language through its folder), or a few blocks'
    worth (languages held in memory, some moved to their folder mid-way when it runs out)."""
    threads = 3
    from megatron_mmbert.data.index import blend, build, pack

    if schedule == "reversed":
        longest_first = build.language_schedule
        monkeypatch.setattr(build, "language_schedule", lambda *a: longest_first(*a)[::-1])
    monkeypatch.setattr(blend, "BLEND_CHUNK", 5)
    monkeypatch.setattr(pack, "PACK_BLOCK_TOKENS", 1)
    monkeypatch.setattr(pack.SpillFiles, "COPY_ROWS", 3)
    monkeypatch.setattr(pack, "SPILL_MEMORY_BYTES", spill_memory)
    monkeypatch.setattr(build, "THREAD_DOCUMENT_BUDGET", 80)  # the 70-document language runs alone
    path, _ = write_corpus(str(tmp_path / "corpus"), [70, 25, 9, 0], max_len=150, shards_per_lang=2)
    manifest = load_manifest(path)
    for name, packing, bin_rows in (("concat", "concat", None), ("best_fit", "best_fit", None),
                                    ("best_fit_micro_batch", "best_fit", DIGEST_BIN_ROWS)):
        for start in (0, 2):
            cache = str(tmp_path / f"cache-{name}-{start}")
            index = build_data_index(manifest, DIGEST_PHASES, seed=7, cache_dir=cache, packing=packing,
                                     start_phase=start, bin_rows=bin_rows, threads=threads)
            assert _index_digest(index) == RECORDED_DIGESTS[f"{name}/start{start}"], (name, start, threads)
            folder, = os.listdir(cache)
            assert not [f for f in os.listdir(os.path.join(cache, folder)) if f.startswith(".spill")]


def test_language_schedule_starts_the_longest_language_first():
    """Issue 29: languages start on threads by their work (row tokens of every phase, plus a cost per
    document), most first, ties in language order; languages without rows do not start."""
    from types import SimpleNamespace

    from megatron_mmbert.data.index import LANGUAGE_DOCUMENT_COST, language_schedule

    plans = [SimpleNamespace(phase=SimpleNamespace(seq_len=s)) for s in (16, 64)]
    counts = np.array([[10, 0, 40, 5, 0], [0, 3, 0, 5, 0]])  # row tokens 160, 192, 640, 400, 0
    docs = [0, 0, 0, 0, 0]
    assert language_schedule(plans, counts, docs, [True] * 5) == [2, 3, 1, 0, 4]
    assert language_schedule(plans, counts, docs, [True, True, False, True, False]) == [3, 1, 0]
    docs = [1, 0, 0, 0, 0]  # language 0's documents are work too
    assert language_schedule(plans, counts, docs, [True] * 5)[:3] == (
        [2, 0, 3] if 160 + LANGUAGE_DOCUMENT_COST > 400 else [2, 3, 0])
    assert language_schedule(plans, np.zeros((2, 3), np.int64), [0] * 3, [True] * 3) == [0, 1, 2]


def test_resumable_packers_and_blender_equal_one_call():
    """PhaseBlender / RowPacker / BestFitPacker block by block (any block size) give the arrays of
    build_blending_indices / pack_rows / pack_best_fit in one call, their counts, stats and end."""
    rng = np.random.default_rng(0)
    for L in (3, 40, 300):  # the scan (few datasets) and the block blender
        W = rng.random((5, L))
        W[W < 0.2] = 0
        S = rng.integers(0, 3000, 5).astype(np.int64)
        S[2] = 0
        di, _, c, _ = ib.build_blending_indices(W, S, np.zeros(5, np.int64), "fast", sample_index=False)
        for block in (1, 7, 333, 10**6):
            b = ib.PhaseBlender(W, S)
            got = np.concatenate([b.next(block) for _ in range(-(-int(S.sum()) // block))])
            assert b.remaining == 0 and got.dtype == di.dtype
            np.testing.assert_array_equal(got, di)
            np.testing.assert_array_equal(b.counts(), c[0])
    sizes = rng.integers(0, 300, 500).astype(np.int32)
    framing = rng.integers(0, 4, 500).astype(np.int8)
    for start, rows, block in [(s, r, b) for s in (0, 12345, 10**6) for r in (0, 1, 777) for b in (1, 3, 10**4)]:
        d, si, _ = ib.pack_rows(sizes, 64, rows, start, 3, 5)
        p = ib.RowPacker(sizes, 64, rows, start, 3, 5)
        parts = [p.next(block)]
        while not p.done:
            parts.append(p.next(block))
        np.testing.assert_array_equal(np.concatenate([a for a, _ in parts]), d)
        np.testing.assert_array_equal(np.concatenate([b for _, b in parts]), si)
    for g, rows, block in [(g, r, b) for g in (1, 4) for r in (0, 1, 33, 500) for b in (1, 16, 40, 10**5)]:
        pieces, flags, ptr, end, st = ib.pack_best_fit(sizes, framing, 64, rows, 0, 3, 5, g, 16, 5120, 2, 8)
        p = ib.BestFitPacker(sizes, framing, 64, rows, 0, 3, 5, g, 16, 5120, 2, 8)
        parts = []
        while not p.done:
            parts.append(p.next(block))
        if parts:
            np.testing.assert_array_equal(np.concatenate([a for a, _, _ in parts]), pieces)
            np.testing.assert_array_equal(np.concatenate([b for _, b, _ in parts]), flags)
        np.testing.assert_array_equal(np.concatenate([[0]] + [e for _, _, e in parts]), ptr)
        assert p.end_token == end and p.stats() == st


def test_best_fit_packer_reads_the_compact_document_table():
    """Issue 29: BestFitPacker on the build's compact table (uint16 lengths with the framing folded in,
    long documents in rows of their own: 2 bytes a document) packs exactly what it packs from int32
    lengths and int8 framing; document_table is that encoding; a table that does not match its long
    rows is refused."""
    from megatron_mmbert.data.index.documents import COMPACT_LONG

    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 400, 3000).astype(np.int32)
    long_docs = rng.choice(3000, 40, replace=False)
    sizes[long_docs] = rng.integers(COMPACT_LONG - 1, 70000, 40)
    sizes[long_docs[0]] = COMPACT_LONG  # exactly the mark: a long row too
    framing = rng.integers(0, 4, 3000).astype(np.int8)
    long = np.sort(np.flatnonzero(sizes >= COMPACT_LONG))
    packed = (np.minimum(sizes, COMPACT_LONG).astype(np.uint16) | (framing.astype(np.uint16) << 14))
    rows = np.stack([long, sizes[long]], axis=1).astype(np.int64)
    args = (512, 300, 1000, 3, 5, 2, 16, 5120, 2, 8)
    start = 0
    for _ in range(2):  # from the start, then from where the first stream stopped (a later epoch)
        a = (512, 300, start) + args[3:]
        ref, got = ib.BestFitPacker(sizes, framing, *a), ib.BestFitPacker(packed, None, *a, long_documents=rows)
        while not ref.done:
            for x, y in zip(ref.next(64), got.next(64)):
                np.testing.assert_array_equal(x, y)
        assert got.done and ref.end_token == got.end_token and ref.stats() == got.stats()
        start = ref.end_token
    bad = rows.copy()
    bad[3, 1] = 5
    for kw, match in ((dict(long_documents=rows[1:]), "long_documents"), (dict(long_documents=bad), "long_documents"),
                      (dict(), "need long_documents")):
        with pytest.raises(ValueError, match=match):
            ib.BestFitPacker(packed, None, *args, **kw)
    with pytest.raises(ValueError, match="framing=None"):
        ib.BestFitPacker(packed, framing, *args, long_documents=rows)


def test_document_table_is_lengths_and_framing(tmp_path):
    from megatron_mmbert.data.index.documents import COMPACT_LONG, document_lengths, document_table

    path, _ = write_corpus(str(tmp_path / "corpus"), [70, 25], max_len=150, shards_per_lang=2)
    manifest = load_manifest(path)
    for lang in manifest.languages:
        prefixes = manifest.languages[lang].shards
        lengths = document_lengths(prefixes)
        framing = (np.arange(len(lengths)) % 4).astype(np.int8)
        packed, long = document_table(prefixes, framing)
        assert packed.dtype == np.uint16 and long.shape == (0, 2)
        np.testing.assert_array_equal(packed & COMPACT_LONG, lengths)
        np.testing.assert_array_equal(packed >> 14, framing)
        with pytest.raises(ValueError, match="framing flags for"):
            document_table(prefixes, framing[1:])


def test_cached_index_uses_int32_where_the_values_fit(tmp_path):
    path, _ = write_corpus(str(tmp_path / "corpus"), [30, 10, 3])
    manifest = load_manifest(path)
    for packing in ("concat", "best_fit"):
        index = build_data_index(manifest, PHASES, seed=1, cache_dir=str(tmp_path / "c"), packing=packing)
        for p in index.phases:
            assert p.dataset_sample_index.dtype == np.int32 and p.dataset_index.dtype == np.int16
            assert p.sample_idx.dtype == np.int32 and p.row_ptr.dtype == np.int32 and p.doc_index.dtype == np.int32


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_npy_appender_appends_a_raw_file(tmp_path, monkeypatch, kernel_copy):
    """Issue 29: a spill file in the appender's dtype goes in as bytes (os.copy_file_range, or a
    buffered copy where that fails), between chunks appended as arrays; a file of the wrong size is
    refused."""
    from megatron_mmbert.data.index import npy

    if not kernel_copy:
        def refuse(*a):
            raise OSError("copy_file_range: not here")
        monkeypatch.setattr(npy.os, "copy_file_range", refuse, raising=False)
    out = npy.NpyAppender(str(tmp_path / "a.npy"), np.int32, (3,))
    a = np.arange(12, dtype=np.int64).reshape(4, 3)
    raw = np.arange(100, 100 + 3 * 5000, dtype=np.int32).reshape(5000, 3)
    raw.tofile(tmp_path / "raw")
    out.append(a)
    out.append_file(str(tmp_path / "raw"), 5000)
    out.append(a[:1])
    with pytest.raises(ValueError, match="are not 4999 rows"):
        out.append_file(str(tmp_path / "raw"), 4999)
    out.close()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.concatenate([a, raw, a[:1]]).astype(np.int32))


def test_npy_appender_widens_when_a_value_does_not_fit(tmp_path):
    from megatron_mmbert.data.index import NpyAppender

    out = NpyAppender(str(tmp_path / "a.npy"), np.int32, (2,), wide=np.int64)
    chunks = [np.arange(6, dtype=np.int64).reshape(3, 2), np.zeros((0, 2), np.int64),
              np.array([[2**31, -1]], np.int64), np.array([[7, 8]], np.int32)]
    for c in chunks:
        out.append(c)
    out.close()
    a = np.load(str(tmp_path / "a.npy"))
    assert a.dtype == np.int64 and not os.path.exists(str(tmp_path / "a.npy.widen"))
    np.testing.assert_array_equal(a, np.concatenate([c.astype(np.int64) for c in chunks]))
    strict = NpyAppender(str(tmp_path / "b.npy"), np.int32)
    with pytest.raises(OverflowError, match="b.npy"):
        strict.append(np.array([2**31], np.int64))


def test_document_first_tokens_through_small_windows(tmp_path, monkeypatch):
    """Read window by window (a few pages each here), the first tokens are megatron-core's."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_mmbert.data.index import documents as index_mod

    path, _ = write_corpus(str(tmp_path / "corpus"), [400], max_len=300, shards_per_lang=2)
    prefixes = load_manifest(path).languages["l0"].shards
    monkeypatch.setattr(index_mod, "FIRST_TOKEN_WINDOW", 4096)
    got = index_mod.document_first_tokens(prefixes)
    ref = []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        ref += [int(ds[int(s)][0]) for s in ds.document_indices[:-1]]
    np.testing.assert_array_equal(got, ref)


def test_sample_index_derived_chunk_by_chunk_equals_the_builders(monkeypatch):
    """build_blending_indices(sample_index=False) gives the same dataset_index and no sample index;
    the streamed build's chunked derivation of it equals the builder's own int64 one."""
    from megatron_mmbert.data.index.blend import _occurrence_numbers

    rng = np.random.default_rng(4)
    w = skewed(rng, 40)[None]
    sizes, phase = np.array([30011], np.int64), np.zeros(1, np.int64)
    di, dsi, counts, _ = ib.build_blending_indices(w, sizes, phase, "fast")
    di2, empty, counts2, _ = ib.build_blending_indices(w, sizes, phase, "fast", sample_index=False)
    np.testing.assert_array_equal(di, di2)
    np.testing.assert_array_equal(counts, counts2)
    assert empty.shape == (0,)
    seen = np.zeros(40, np.int64)
    got = np.concatenate([_occurrence_numbers(di[a:a + 997], seen, np.int32) for a in range(0, len(di), 997)])
    np.testing.assert_array_equal(got, dsi)
    np.testing.assert_array_equal(seen, counts[0])


def test_document_lengths_chunked_over_multi_sequence_documents(tmp_path, monkeypatch):
    """Documents made of several sequences, read a few documents at a time: megatron-core's sums."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_mmbert.data.index import documents as index_mod

    rng = np.random.default_rng(2)
    prefixes = []
    for k in range(2):
        prefix = str(tmp_path / f"part-{k}")
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
        for _ in range(23):
            seqs = [int(x) for x in rng.integers(0, 9, size=int(rng.integers(1, 4)))]
            b.add_document(rng.integers(5, 50, size=sum(seqs)).astype(np.int32), seqs)
        b.finalize(prefix + ".idx")
        prefixes.append(prefix)
    ref, first = [], []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        for d in range(len(ds.document_indices) - 1):
            a, z = ds.document_indices[d], ds.document_indices[d + 1]
            ref.append(int(ds.sequence_lengths[a:z].sum()))
            first.append(int(ds[int(a)][0]) if ds.sequence_lengths[a] > 0 else -1)
    monkeypatch.setattr(index_mod, "DOCUMENT_CHUNK", 5)
    np.testing.assert_array_equal(index_mod.document_lengths(prefixes), ref)
    np.testing.assert_array_equal(index_mod.document_first_tokens(prefixes), first)
    # Framing reads first and last tokens in one pass (issue 29): the same as the two separate reads.
    for prefix, ds, docs in index_mod._document_chunks(prefixes):
        got_first, got_last = index_mod._first_and_last_tokens(prefix, ds, docs)
        np.testing.assert_array_equal(got_first, index_mod._first_tokens(prefix, ds, docs[:-1]))
        np.testing.assert_array_equal(got_last, index_mod._last_tokens(prefix, ds, docs))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64])
def test_tokens_at_reads_the_bin_as_numpy_does(tmp_path, dtype):
    """Issue 29: the C++ read of tokens at byte offsets of a .bin (windows of a few bytes here, so
    many maps) equals numpy's; offsets outside the file or out of order are refused."""
    info = np.iinfo(dtype)
    tokens = np.random.default_rng(0).integers(info.min, info.max, 3000, dtype=dtype, endpoint=True)
    path = str(tmp_path / "t.bin")
    tokens.tofile(path)
    at = np.unique(np.random.default_rng(1).integers(0, len(tokens), 700)).astype(np.int64)
    pointers = at * np.dtype(dtype).itemsize
    for window in (1, 100, 5000, 1 << 20):
        got = ib.tokens_at(path, pointers, np.dtype(dtype).str, window)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, tokens[at].astype(np.int64))
    with pytest.raises(ValueError, match="outside the file"):
        ib.tokens_at(path, np.array([0, len(tokens) * np.dtype(dtype).itemsize], np.int64), np.dtype(dtype).str, 64)
    with pytest.raises(ValueError, match="out of order"):
        ib.tokens_at(path, pointers[::-1].copy(), np.dtype(dtype).str, 64)
    with pytest.raises(ValueError, match="integer dtype"):
        ib.tokens_at(path, pointers, "<f4", 64)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_pread_tokens_reads_the_bin_as_numpy_does(tmp_path, dtype):
    """Issue 29: the framing sample's C++ read of tokens at byte offsets (any order, a pread each, the GIL
    released once) equals numpy's; a negative offset or one past the end is reported by its index."""
    tokens = np.random.default_rng(0).integers(np.iinfo(dtype).min, np.iinfo(dtype).max, 500, dtype=dtype)
    path = str(tmp_path / "t.bin")
    tokens.tofile(path)
    at = np.random.default_rng(1).integers(0, len(tokens), 90).astype(np.int64)  # unsorted, repeats
    size = np.dtype(dtype).itemsize
    got, bad = ib.pread_tokens(path, at * size, np.dtype(dtype).str)
    assert bad == -1 and got.dtype == np.int64
    np.testing.assert_array_equal(got, tokens[at].astype(np.int64))
    for wrong in (-size, len(tokens) * size, len(tokens) * size - 1):
        got, bad = ib.pread_tokens(path, np.array([0, size, wrong, 0], np.int64), np.dtype(dtype).str)
        assert bad == 2
        np.testing.assert_array_equal(got[:2], tokens[:2].astype(np.int64))


def test_index_at_scale_schedule_simulation():
    """Issue 29: the benchmark's model of the threaded build (benchmarks/index_at_scale.simulate) on
    cases worked by hand: workers, in-order writes with their copy time, the document budget, and
    framing chunks queued first come first served on their own pool."""
    from benchmarks.index_at_scale import simulate

    names, order = ["a", "b", "c", "d"], ["a", "d", "b", "c"]
    task, one = {"a": 4, "b": 1, "c": 1, "d": 2}, {n: 1 for n in names}
    assert simulate(order, names, task, {}, one, 1, 10)["seconds"] == 8
    assert simulate(order, names, task, {}, one, 2, 10)["seconds"] == 4  # a | d, b, c
    # a ends at 4 and is written (0.5 each) before b, c, d, which waited in their spill folders
    assert simulate(order, names, task, {n: 0.5 for n in names}, one, 2, 10)["seconds"] == 6
    assert simulate(order, names, task, {}, {n: 5 for n in names}, 2, 6)["seconds"] == 8  # one at a time
    # a's scan (4 s in 2 chunks) spread over 2 framing workers; d's chunks queue behind them
    r = simulate(order, names, task, {}, {n: 1 << 17 for n in names}, 2, 1 << 30,
                 framing_s={"a": 4, "b": 0, "c": 0, "d": 0})
    assert r["seconds"] == 4 and r["longest_task"] == "a"


def test_index_at_scale_synthetic_manifest_is_readable(tmp_path):
    """The benchmark's synthetic shards (.idx written directly, sparse .bin) are what megatron-core reads."""
    import json

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from benchmarks.index_at_scale import NUM_LANGUAGES, write_manifest

    path = write_manifest(str(tmp_path / "m"), 2e-7)
    m = json.load(open(path))
    assert len(m["languages"]) == NUM_LANGUAGES and "dclm" in m["languages"] and "starcoder" in m["languages"]
    docs = sorted(e["documents"] for e in m["languages"].values())
    assert docs[-1] > 20 * docs[len(docs) // 2]  # heavy-tailed
    for lang in ("dclm", "starcoder", "x0100_Synt"):
        e = m["languages"][lang]
        ds = IndexedDataset(os.path.join(os.path.dirname(path), e["shards"][0]))
        assert len(ds) == e["documents"] and int(ds.sequence_lengths.sum()) == e["tokens"]
        assert len(ds[len(ds) - 1]) == ds.sequence_lengths[-1]  # the last document lies inside the .bin
