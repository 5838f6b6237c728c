"""Shared pytest setup: run from the source tree, quiet megatron-core's optional-dependency warnings,
hold every test that starts a process to its ``slow`` marker, and the session fixtures every module
may use (pytest finds them here; nothing to import).

Helpers (plain functions) live in ``tests/helpers/``, imported as ``tests.helpers.<name>``; the
repository root and the one launcher are tests/helpers/launch.py's.
"""

import multiprocessing.util
import os
import subprocess
import sys
import warnings

import pytest

# The repository (this file's parent's parent) on sys.path, so that ``tests.helpers`` imports.
_repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _repository not in sys.path:
    sys.path.insert(0, _repository)

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from tests.helpers.demo_data import DEMO_LANGUAGES, DEMO_MAX_CHARS, DEMO_VOCAB, require_catalogs  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Honest markers: a test that starts a process (a subprocess, torchrun, a multiprocessing "spawn"
# worker -- each a fresh interpreter that imports torch) is ``slow``, so ``-m "not slow"`` is a fast
# loop. One that starts a process unmarked (itself or through a fixture it is the first to need)
# fails here, naming the command.


# Small programs that libraries run for themselves, not launches of ours: matplotlib's font manager
# asks fontconfig for the fonts once per cache.
LIBRARY_HELPERS = {"fc-list"}


class UnmarkedProcess(Exception):
    pass


def _refuse(what):
    raise UnmarkedProcess(f"this test starts a process ({what}) but is not marked @pytest.mark.slow; mark it "
                          "(tests that launch processes are slow, see tests/helpers/launch.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _processes_refused_unless_slow(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _processes_refused_unless_slow(item):
        yield


class _processes_refused_unless_slow:
    def __init__(self, item):
        self.active = item.get_closest_marker("slow") is None

    def __enter__(self):
        if self.active:
            self.popen_init, self.spawnv = subprocess.Popen.__init__, multiprocessing.util.spawnv_passfds
            popen_init = self.popen_init

            def guarded_init(popen, args, *a, **k):
                argv = [str(x) for x in args] if isinstance(args, (list, tuple)) else [str(args)]
                if os.path.basename(argv[0]) not in LIBRARY_HELPERS:
                    popen._child_created = False  # what Popen.__del__ reads of an object never started
                    _refuse(" ".join(argv)[:200])
                return popen_init(popen, args, *a, **k)

            subprocess.Popen.__init__ = guarded_init
            multiprocessing.util.spawnv_passfds = lambda path, args, passfds: _refuse(f"multiprocessing: {path}")

    def __exit__(self, *exc):
        if self.active:
            subprocess.Popen.__init__, multiprocessing.util.spawnv_passfds = self.popen_init, self.spawnv
        return False


# ------------------------------------------------------------------------------------------------
# The demo data: a small real multilingual corpus, its tokenizer and its shards (tests/helpers/demo_data.py)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Path of a FineWeb2-layout corpus folder (``data/{lang}_{Script}/train/000.parquet``)."""
    from megatron_mmbert.data.demo_corpus import DemoCorpusOptions, build_gettext_corpus

    require_catalogs()
    out = str(tmp_path_factory.mktemp("demo_corpus"))
    build_gettext_corpus(
        out, DemoCorpusOptions(languages=DEMO_LANGUAGES, max_chars_per_language=DEMO_MAX_CHARS, doc_chars=800,
                               row_group_docs=8)
    )
    return out


@pytest.fixture(scope="session")
def demo_tokenizer(demo_corpus, tmp_path_factory):
    """Path of an HF tokenizer folder trained on ``demo_corpus`` (ids 0-4 <pad> <eos> <bos> <unk> <mask>)."""
    from megatron_mmbert.data.demo_corpus import train_tokenizer

    return train_tokenizer(demo_corpus, str(tmp_path_factory.mktemp("demo_tokenizer")), vocab_size=DEMO_VOCAB)


@pytest.fixture(scope="session")
def demo_shards(demo_corpus, demo_tokenizer, tmp_path_factory):
    """Path of a preprocessed output folder (``manifest.json`` + per-language shards) of ``demo_corpus``;
    small work units so big languages get several shards."""
    from megatron_mmbert.data.preprocess import PreprocessConfig, run_preprocess

    out = str(tmp_path_factory.mktemp("demo_shards"))
    run_preprocess(PreprocessConfig(inputs=[demo_corpus], output=out, tokenizer=demo_tokenizer,
                                    workers=1, chunk_bytes=8 << 10))
    return out


# ------------------------------------------------------------------------------------------------
# One finished tiny three-phase run, shared by every check that only reads a finished run (its log
# lines, TensorBoard, evaluations, checkpoints) and the one-process exact-resume reference. A test
# that uses it launches a process (once per session): it is ``slow``. Never write into it; a test
# that relaunches it checks that nothing changed.


@pytest.fixture(scope="session")
def tiny_run(demo_shards, tmp_path_factory):
    """A :class:`tests.helpers.training.FinishedRun`: ``tiny_run_config`` with
    ``TINY_RUN_SECTIONS`` over the demo shards, trained to the end on one process."""
    from tests.helpers.training import finished_tiny_run

    return finished_tiny_run(str(tmp_path_factory.mktemp("tiny_run")), os.path.join(demo_shards, "manifest.json"))
