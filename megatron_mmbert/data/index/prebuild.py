"""A schedule's index built ahead of launch (``mmbert-build-index``): :class:`BuildIndexConfig`, what to
build, with its own checks, and :func:`prebuild_index`, the library entry the command line calls -- the
config's checks, the checks against the training run the index is for, the language coverage report,
every shard checked, then :func:`~megatron_mmbert.data.index.cache.build_data_index` as the builder.
"""

from __future__ import annotations

import dataclasses
from typing import List, Literal, Optional

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError, check
from megatron_mmbert.data.index.arrays import DataIndex
from megatron_mmbert.data.index.cache import build_data_index
from megatron_mmbert.data.languages import Coverage, LanguageListError, manifest_coverage
from megatron_mmbert.data.shards import check_manifest_shards, load_manifest


@dataclasses.dataclass
class BuildIndexConfig:
    """What to build: the phases, the data and the run values that key the index cache.

    From a training run config all but the last three fields are the run's own
    (``RunConfig.index_config``); from a phase list (a YAML list of phases, or a mapping with
    ``phases:`` and these fields) ``manifest``, ``cache_dir`` and ``seed`` must be given.
    """

    phases: List[PhaseConfig] = dataclasses.field(default_factory=list)
    """The training phases (fields of ``PhaseConfig``), in order."""
    manifest: Optional[str] = None
    """manifest.json written by tools/preprocess_data.py (or its folder)."""
    cache_dir: Optional[str] = None
    """Folder for the index arrays (shared by all ranks)."""
    seed: Optional[int] = None
    """Data seed of the run (shuffles and masks)."""
    global_batch_size: Optional[int] = None
    """Rows per step for phases that do not set global_batch_size (rounds sample counts)."""
    anneal_segments: int = 64
    """Segments per temperature-annealed phase."""
    start_phase: Optional[str] = None
    """First phase to build (earlier ones are planned for the stream positions only)."""
    packing: Optional[Literal["concat", "best_fit"]] = None
    """Row packing (``data.packing`` of the run: ``best_fit`` as mmBERT, or ``concat``); from a run
    config it must equal the run's, else the run would not find this index. Phase lists: default concat."""
    bin_rows: Optional[List[int]] = None
    """best_fit: ``seq_len`` rows per packed row, one per phase (None: one row each). From a run config:
    its micro-batch sizes under ``data.packed_row: micro_batch`` (the reference's geometry)."""
    language_list: str = "mmbert-1833"
    """Report which languages of this list the manifest lacks and which keys it has beyond it
    (``data/languages.py``): ``mmbert-1833`` (mmBERT's released 1,833), a file of codes, or ``none``.
    From a run config: its ``data.language_list``."""
    threads: int = 0
    """Languages packed at once (0: every CPU this process may use); the arrays do not depend on it."""
    warn_epochs: float = 5.0
    """Flag languages repeated more than this many epochs."""
    rows: int = 15
    """Top rows per table (plus 5 bottom rows)."""

    @property
    def start_phase_index(self) -> int:
        """Index of ``start_phase`` in ``phases`` (0 without)."""
        return [p.name for p in self.phases].index(self.start_phase) if self.start_phase else 0

    def validate(self) -> None:
        """Refuse what cannot be built, every problem at once, each naming its field (the phases check
        themselves). Reads no file: :func:`prebuild_index` reads the manifest and the language list."""
        errors = [ConfigError(message, field=field) for field, message in self._problems()]
        if errors:
            raise ConfigError.combine(errors)

    def _problems(self):
        if not self.phases:
            yield "phases", "no phases (a non-empty list of phases is needed)"
        for name in ("manifest", "cache_dir", "seed"):  # a run config gives all three
            if getattr(self, name) is None:
                yield name, (f"{name} is not set: a phase list needs manifest, cache_dir and seed (next to "
                             "phases: in the YAML, or as options)")
        names = [p.name for p in self.phases]
        if self.start_phase is not None and self.start_phase not in names:
            yield "start_phase", f"start_phase {self.start_phase!r} is not a phase; phases are {names}"


@dataclasses.dataclass
class PrebuiltIndex:
    """What :func:`prebuild_index` made."""

    index: DataIndex
    """The index, read from the cache folder or built into it (``index.path``)."""
    coverage: Optional[Coverage]
    """The manifest's languages against ``language_list`` (None for ``none``)."""


def prebuild_index(cfg: BuildIndexConfig, vocab_size: Optional[int] = None, run: Optional[BuildIndexConfig] = None,
                   run_name: str = "the run config") -> PrebuiltIndex:
    """Build ``cfg``'s index into ``cfg.cache_dir`` (or find it there), as the training run would.

    Checks first, before any array is built: ``cfg``'s own rules (a config built in Python too);
    with ``run`` -- the config the training run's own settings give (``RunConfig.index_config()``),
    named ``run_name`` in messages -- that ``cfg`` packs rows as the run does (``packing``,
    ``bin_rows``: both key the cache, so the run would not find another's); the language list read
    (``language_list``); every shard a phase may read checked against its index and ``vocab_size``
    (the model's; None: the manifest tokenizer's), so damaged or foreign shards fail here, naming the
    file, not in the middle of training. Raises :class:`ConfigError` naming the field to blame.
    """
    check(cfg)
    if run is not None:
        _check_against_run(cfg, run, run_name)
    manifest = load_manifest(cfg.manifest)
    try:
        coverage = manifest_coverage(manifest, cfg.language_list)
    except LanguageListError as e:
        raise LanguageListError(str(e), field="language_list") from None
    check_manifest_shards(manifest, [lang for lang, e in manifest.languages.items() if e.shards],
                          vocab_size or manifest.tokenizer.vocab_size)
    index = build_data_index(manifest, cfg.phases, cfg.seed, cfg.cache_dir, cfg.global_batch_size,
                             cfg.anneal_segments, is_builder=True, start_phase=cfg.start_phase_index,
                             packing=cfg.packing or "concat", bin_rows=cfg.bin_rows, threads=cfg.threads)
    return PrebuiltIndex(index, coverage)


def _check_against_run(cfg: BuildIndexConfig, run: BuildIndexConfig, run_name: str) -> None:
    """``cfg`` packs rows as the run does (both problems at once)."""
    errors = []
    if cfg.bin_rows != run.bin_rows:
        errors.append(ConfigError(
            f"bin_rows {cfg.bin_rows} differs from {run_name}'s packed rows {run.bin_rows} (data.packed_row, "
            "batch.micro_batch_size); the run would not find this index (override the run's settings instead)",
            field="bin_rows"))
    if cfg.packing != run.packing:
        errors.append(ConfigError(
            f"packing {cfg.packing} differs from {run_name}'s data.packing {run.packing}; the run would not find "
            "this index (override the run's data.packing instead)", field="packing"))
    if errors:
        raise ConfigError.combine(errors)
