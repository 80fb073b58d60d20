"""The config schema: one typed dataclass per Hydra group, registered in a ConfigStore.

YAML files under conf/ only set values; these classes say which keys exist and their types,
so a misspelled key or a wrong type fails when Hydra composes the config, before any process
group starts. Checks that need more than a type live in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from modules.budget import parse_bytes
from modules.criteo import CATEGORICAL_NAMES as CRITEO_CATEGORICAL_NAMES
from modules.criteo import NUM_DENSE as CRITEO_NUM_DENSE
from modules.features import FeatureSpec, check_hashing_option
from modules.synthetic import PlantedSignal

SHARDING_TYPES = (
    "data_parallel",
    "table_wise",
    "column_wise",
    "table_column_wise",
    "row_wise",
    "table_row_wise",
)
SHARDING_PRESETS = ("auto", "mixed", *SHARDING_TYPES)
COMMS_PRECISIONS = ("fp32", "bf16", "fp16")
EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
LOGGER_MODES = ("offline", "online", "disabled")


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where}={value!r} is not one of {', '.join(choices)}")


def _check_positive(where: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{where} must be > 0, got {value}")


def spec_schema(
    spec: type,
    name: str,
    doc: str,
    *,
    leave_out: tuple[str, ...] = (),
    types: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    extra: tuple[tuple[str, Any, Any], ...] = (),
) -> type:
    """The Hydra schema of a frozen spec of modules/: a mutable dataclass with the spec's fields
    (names, types, defaults; ``types``/``defaults`` replace some, ``extra`` adds some first).

    Hydra cannot override a frozen dataclass's fields, so the config holds this copy and
    ``spec_values`` turns it back into the spec once, whose ``__post_init__`` checks it: the
    fields, their meaning (the spec's docstring) and their checks live in modules/ alone.
    """
    hints = typing.get_type_hints(spec)
    fields = [(key, type_, field(default=default)) for key, type_, default in extra]
    for spec_field in dataclasses.fields(spec):
        if spec_field.name in leave_out:
            continue
        default = (defaults or {}).get(spec_field.name, spec_field.default)
        type_ = (types or {}).get(spec_field.name, hints[spec_field.name])
        fields.append((spec_field.name, type_, field(default=default)))
    return dataclasses.make_dataclass(
        name, fields, namespace={"__doc__": doc, "__module__": __name__}
    )


def spec_values(config: Any, spec: type) -> dict[str, Any]:
    """The values of ``config`` (built by ``spec_schema``) for the fields of ``spec``."""
    return {
        spec_field.name: getattr(config, spec_field.name)
        for spec_field in dataclasses.fields(spec)
        if hasattr(config, spec_field.name)
    }


FeatureConfig = spec_schema(
    FeatureSpec,
    "FeatureConfig",
    """One categorical feature; its table is named after it (hashing shared: after its group).
    Fields: those of FeatureSpec (modules/features.py) but its name (the key) and ``hashing``:
    this feature's hashing method unless hashing.features names it (null = hashing.method);
    e.g. none for IDs that already are row numbers in [0, num_embeddings).""",
    leave_out=("name",),
    types={"hashing": Optional[str]},
    defaults={"id_space": MISSING, "num_embeddings": MISSING, "hashing": None},
)


@dataclass
class FeatureGroupConfig:
    """Features embedded by one EmbeddingBagCollection."""

    # Embedding dim of every table in the group; null = the feature set's embedding_dim.
    embedding_dim: Optional[int] = None
    features: Dict[str, FeatureConfig] = field(default_factory=dict)


GeneratedTablesConfig = spec_schema(
    FeatureSpec,
    "GeneratedTablesConfig",
    """Many similar tables without listing each one (for many-table stress sets): num_tables
    features t000, t001... split over num_groups groups, each with these FeatureSpec fields
    (modules/features.py), hashed with hashing.method.""",
    leave_out=("name", "hashing"),
    defaults={"id_space": 1_000_000, "num_embeddings": 10_000, "signal_weight": 0.2},
    extra=(("num_tables", int, 0), ("num_groups", int, 1)),
)


@dataclass
class FeaturesConfig:
    """A named feature set: groups of categorical features plus dense features."""

    name: str = MISSING
    # Default embedding dim for groups that do not set their own.
    embedding_dim: int = 16
    num_dense_features: int = 13
    groups: Dict[str, FeatureGroupConfig] = field(default_factory=dict)
    # Extra tables named t000, t001... split over groups g0, g1...
    generated: GeneratedTablesConfig = field(default_factory=GeneratedTablesConfig)

    def __post_init__(self) -> None:
        _check_positive("features.embedding_dim", self.embedding_dim)
        if self.num_dense_features < 0:
            raise ValueError(f"features.num_dense_features must be >= 0, got {self.num_dense_features}")


def _check_hashing_values(where: str, values: "HashingConfig | FeatureHashingConfig") -> None:
    """Check every option set (not null) with the spec's own check, naming the config key."""
    for option in ("method", "num_hashes", "combine", "importance_rows", "q", "num_frequent",
                   "eviction_policy", "eviction_interval"):
        value = getattr(values, option)
        if value is not None:
            check_hashing_option(f"{where}.{option}", option, value)


@dataclass
class FeatureHashingConfig:
    """Per-feature hashing override; null fields take the hashing group's value."""

    method: Optional[str] = None
    num_hashes: Optional[int] = None
    combine: Optional[str] = None
    importance_rows: Optional[int] = None
    q: Optional[int] = None
    num_frequent: Optional[int] = None
    eviction_policy: Optional[str] = None
    eviction_interval: Optional[int] = None
    # Rows of the feature's table, over its feature config's num_embeddings and
    # hashing.compression_ratio; with a budget, it pins the feature (as method does).
    num_embeddings: Optional[int] = None


@dataclass
class HashingConfig:
    """How raw IDs reach table rows, per feature (modules/hashing.py describes the methods)."""

    name: str = MISSING
    # Method of every feature that neither hashing.features nor its feature config names:
    # none | modulo | hash | multi_hash | qr | frequency | managed | shared.
    method: str = "hash"
    # multi_hash: hashes (probes) per ID, k >= 1.
    num_hashes: int = 2
    # multi_hash: sum | concat (default sum); qr: mult | sum | concat (default mult).
    combine: Optional[str] = None
    # multi_hash: rows of the learned importance-weight table (0 = plain multi-hash).
    importance_rows: int = 0
    # multi_hash, where importance_rows is 0: features with one ID per sample get
    # ceil(share x their rows) importance-weight rows (0 = none), so the weights follow the
    # tables when a compression ratio or budget resizes them.
    importance_share: float = 0.0
    # qr: remainder-table rows q >= 2; 0 = ceil(id_space / num_embeddings) (quotient ~ R rows).
    q: int = 0
    # frequency: IDs with own rows; null = all the file lists, up to frequent_share of the
    # feature's rows (and never all of them: one row at least stays for the other IDs).
    num_frequent: Optional[int] = None
    frequent_share: float = 0.5
    # frequency: file written by scripts/count_frequencies.py (feature -> IDs, most frequent first).
    frequency_file: Optional[str] = None
    # managed: which IDs keep their rows when new ones arrive: distance_lfu (counts decayed by
    # the steps since the last access) | lfu | lru.
    eviction_policy: str = "distance_lfu"
    # managed: training steps between admissions of the IDs seen since the last one.
    eviction_interval: int = 10
    # If set, every feature not hashed with none gets ceil(id_space / ratio) rows (sweeps;
    # shared features bring theirs to their group's table); below 1 gives hash / multi_hash /
    # shared features more rows than IDs (fewer collisions).
    compression_ratio: Optional[float] = None
    # A memory budget instead (modules/budget.py: every row earns the same traffic): bytes of
    # all tables (parameters + optimizer state + ID maps), as an int or with a unit (86kB,
    # 2GiB); hashrec chooses each feature's method (hash or frequency) and rows from the
    # declared ID spaces and, where hashing.frequency_file lists a feature, its measured
    # frequencies. Features whose method or rows are pinned (their feature config's
    # hashing key, hashing.features.<f>.method or .num_embeddings) keep them and are paid
    # first; hashing.method and num_frequent do not apply to the others.
    budget_bytes: Any = None
    # The same per rank: the budget is this times the world size (plan_only: the
    # plan_topology's). How a rank's share comes out depends on the sharding plan (row-wise
    # splits a table evenly; table-wise places whole tables), which the job prints.
    budget_bytes_per_rank: Any = None
    # Salts every hash: another seed gives independent hash functions.
    seed: int = 0
    # Per-feature overrides: feature name -> fields of FeatureHashingConfig, e.g.
    # +hashing.features.user_id.method=qr. Typed Any (then checked below) because Hydra
    # cannot append to a dict of dataclasses from the command line.
    features: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_hashing_values("hashing", self)
        # Below 1: more rows than IDs, for hashed features (modules/features.py).
        if self.compression_ratio is not None and self.compression_ratio <= 0:
            raise ValueError(
                f"hashing.compression_ratio must be > 0, got {self.compression_ratio}"
            )
        if self.importance_share < 0:
            raise ValueError(f"hashing.importance_share must be >= 0, got {self.importance_share}")
        if not 0 < self.frequent_share <= 1:
            raise ValueError(
                f"hashing.frequent_share must be in (0, 1], got {self.frequent_share}"
            )
        self._check_budget()
        known = {f.name for f in dataclasses.fields(FeatureHashingConfig)}
        for name, override in list(self.features.items()):
            if isinstance(override, str):  # +hashing.features.user_id=qr: just the method
                override = {"method": override}
            if not isinstance(override, dict) or not set(override) <= known:
                raise ValueError(
                    f"hashing.features.{name}={override!r}: expected a method name or a dict "
                    f"with keys among {sorted(known)}"
                )
            self.features[name] = FeatureHashingConfig(**override)
            _check_hashing_values(f"hashing.features.{name}", self.features[name])
            if self.features[name].num_embeddings is not None:
                _check_positive(f"hashing.features.{name}.num_embeddings",
                                self.features[name].num_embeddings)

    def _check_budget(self) -> None:
        """At most one budget, in whole bytes (stored as an int), and no compression ratio."""
        keys = [key for key in ("budget_bytes", "budget_bytes_per_rank")
                if getattr(self, key) is not None]
        if len(keys) > 1:
            raise ValueError(
                f"hashing.budget_bytes={self.budget_bytes!r} and hashing.budget_bytes_per_rank="
                f"{self.budget_bytes_per_rank!r} are both set: set one (the total, or the bytes "
                f"per rank times the world size)"
            )
        for key in keys:
            setattr(self, key, parse_bytes(f"hashing.{key}", getattr(self, key)))
            if self.compression_ratio is not None:
                raise ValueError(
                    f"hashing.{key}={getattr(self, key)} and hashing.compression_ratio="
                    f"{self.compression_ratio:g} both size the tables: set "
                    f"hashing.compression_ratio=null to size them by the budget"
                )


@dataclass
class ModelConfig:
    """The dense side of DLRM: bottom MLP, interaction, top MLP."""

    name: str = MISSING
    # dot (DLRM) or dcn (DLRM-DCNv2).
    interaction: str = "dot"
    # Bottom MLP; for dot the last size must equal the embedding dim.
    dense_layer_sizes: List[int] = field(default_factory=lambda: [64, 16])
    # Top MLP, ending in 1 (the click logit).
    over_layer_sizes: List[int] = field(default_factory=lambda: [128, 64, 1])
    # DCNv2 cross layers and their low rank.
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 512

    def __post_init__(self) -> None:
        _check_choice("model.interaction", self.interaction, ("dot", "dcn"))


PlantedSignalConfig = spec_schema(
    PlantedSignal,
    "PlantedSignalConfig",
    "Weights of the planted click logit of the synthetic data: PlantedSignal (modules/synthetic.py).",
)


DATA_SOURCES = ("synthetic", "criteo", "parquet")


@dataclass
class DataConfig:
    """Where batches come from."""

    name: str = MISSING
    # synthetic: planted-signal data generated on the fly; criteo: Criteo click logs (raw
    # files, preprocessed on first use, or preprocessed shard directories); parquet: a
    # directory of Parquet files with the columns named below.
    source: str = "synthetic"
    # synthetic: held-out batches per rank evaluated at each evaluation.
    eval_batches: int = 8
    # Training batches made ahead on a background thread (0 = make each when it is needed).
    prefetch_batches: int = 2
    planted: PlantedSignalConfig = field(default_factory=PlantedSignalConfig)
    # criteo / parquet: training and held-out data (files or directories).
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    # criteo: where raw files are preprocessed to (once; reused while the input is unchanged).
    cache_dir: str = "data_cache"
    # A malformed row: fail (name file and line) or skip (counted in the summary).
    on_bad_row: str = "fail"
    # The features= option this data's columns are named for, which its defaults select; named
    # in the error when the chosen feature set does not fit the columns (null = any set).
    feature_set: Optional[str] = None
    # parquet: column names. With features=from_data (data=parquet's default) each
    # categorical column is a feature; empty lists = every column of the schema but the label
    # (numbers dense, integer / string IDs and lists of them categorical). With a feature
    # YAML the categorical columns must be named like its features.
    label_column: str = "label"
    dense_columns: List[str] = field(default_factory=list)
    categorical_columns: List[str] = field(default_factory=list)
    # parquet, features=from_data: group name -> its categorical columns (one
    # EmbeddingBagCollection each); columns not listed form a group named "categorical".
    feature_groups: Dict[str, List[str]] = field(default_factory=dict)
    # parquet: a null dense value fails (names file and row), becomes 0, or the column's mean.
    dense_null: str = "fail"
    # parquet: dense values as they are, log(1 + max(x, 0)), or standardised (x - mean) / std.
    dense_transform: str = "none"
    # parquet: training rows are shuffled within windows of this many rows (rounded up to a
    # multiple of the batch size), by (seed, rank, window): resumes stay exact. 0 = file order.
    shuffle_rows: int = 0
    # parquet: rows read (in file order) to measure the statistics: distinct IDs (ID spaces of
    # a derived feature set), dense means and standard deviations. Saved in the run directory
    # (data_statistics.json) and reused on resume.
    statistics_rows: int = 1_000_000

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, DATA_SOURCES)
        _check_positive("data.eval_batches", self.eval_batches)
        if self.prefetch_batches < 0:
            raise ValueError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}")
        _check_choice("data.on_bad_row", self.on_bad_row, ("fail", "skip"))
        _check_choice("data.dense_null", self.dense_null, ("fail", "zero", "mean"))
        _check_choice("data.dense_transform", self.dense_transform, ("none", "log", "standardize"))
        if self.shuffle_rows < 0:
            raise ValueError(f"data.shuffle_rows must be >= 0, got {self.shuffle_rows}")
        _check_positive("data.statistics_rows", self.statistics_rows)
        if self.source != "synthetic" and not (self.train_path and self.eval_path):
            raise ValueError(f"data.source={self.source} needs data.train_path and data.eval_path")


@dataclass
class ShardingConfig:
    """How tables are placed over ranks."""

    name: str = MISSING
    # auto (TorchRec planner picks), mixed, or one sharding type for every table.
    preset: str = "auto"
    # Per-table override: table name -> sharding type; wins over the preset.
    tables: Dict[str, str] = field(default_factory=dict)
    # mixed: tables with more rows than this are row-wise, the rest table-wise.
    mixed_row_threshold: int = 100_000
    # Planner memory caps per rank (bytes); null = the GPU's own memory, and the host's memory
    # shared by its local ranks (train/memory_caps.py).
    hbm_cap_bytes: Optional[int] = None
    ddr_cap_bytes: Optional[int] = None
    # Pooled embeddings (forward) and their gradients (backward) between ranks: fp32, or
    # bf16 / fp16 for half the bytes (train/comms.py).
    comms_precision: str = "fp32"

    def __post_init__(self) -> None:
        _check_choice("sharding.preset", self.preset, SHARDING_PRESETS)
        _check_choice("sharding.comms_precision", self.comms_precision, COMMS_PRECISIONS)
        for table, sharding_type in self.tables.items():
            _check_choice(f"sharding.tables.{table}", sharding_type, SHARDING_TYPES)
        _check_positive("sharding.mixed_row_threshold", self.mixed_row_threshold)
        for key, cap in (("hbm_cap_bytes", self.hbm_cap_bytes), ("ddr_cap_bytes", self.ddr_cap_bytes)):
            if cap is not None:
                _check_positive(f"sharding.{key}", cap)


@dataclass
class OptimConfig:
    """Fused embedding optimizer, dense optimizer, and the learning-rate schedule."""

    name: str = MISSING
    # Applied inside the backward pass by TorchRec's fused kernels.
    embedding: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    dense: str = "adagrad"
    dense_lr: float = 0.05
    eps: float = 1e-8
    # The TorchRec DLRM example's schedule (train/optimizers.py lr_scale): linear warm-up over
    # warmup_steps, constant, then from decay_start_step a polynomial decay over decay_steps
    # (0 = none) that keeps its last value, floored at 1e-7, once it ends.
    warmup_steps: int = 0
    decay_start_step: int = 0
    decay_steps: int = 0
    # The settings the model is stable with under this optimizer (optim key -> value), from
    # conf/model_optim/<model>_<optim>.yaml, which Hydra loads after the optim group: the keys
    # above hold these values unless the command line or an experiment sets them. Empty: the
    # optimizer's own settings. The job prints them before training (train/model_settings.py).
    model_settings: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(OptimConfig)} - {"name", "model_settings"}
        for key in self.model_settings:
            if key not in known:
                raise ValueError(
                    f"optim.model_settings.{key}: OptimConfig has no field '{key}' "
                    f"(one of {', '.join(sorted(known))})"
                )
        _check_choice("optim.embedding", self.embedding, EMBEDDING_OPTIMIZERS)
        _check_choice("optim.dense", self.dense, DENSE_OPTIMIZERS)
        _check_positive("optim.embedding_lr", self.embedding_lr)
        _check_positive("optim.dense_lr", self.dense_lr)
        for key in ("warmup_steps", "decay_start_step", "decay_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if self.decay_steps > 0 and self.decay_start_step < self.warmup_steps:
            raise ValueError(
                f"optim.decay_start_step={self.decay_start_step} is before the warm-up ends "
                f"(optim.warmup_steps={self.warmup_steps}): the decay must start after it"
            )


@dataclass
class LoggerConfig:
    """Metrics to W&B and metrics.jsonl (rank 0 only), progress on rank 0's console."""

    name: str = MISSING
    # W&B: offline (files under the run dir, `wandb sync` later; no network), online, disabled.
    mode: str = "offline"
    # Every this many steps: gather per-rank figures (one collective), log, report progress.
    log_every: int = 50
    # W&B project, entity (user or team; null = the key's default), group, tags, run name.
    project: str = "hashrec"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    run_name: Optional[str] = None
    # Force a W&B run id; null = the id saved in the run dir (a resumed job continues it) or new.
    run_id: Optional[str] = None
    # Seconds wandb.init may wait for the W&B server before the run falls back to offline.
    init_timeout_s: float = 90.0
    # online: W&B's system monitor (CPU/GPU utilisation charts); always off offline.
    system_stats: bool = True
    # Also write every metric to <run dir>/metrics.jsonl (readable without W&B).
    jsonl: bool = True
    # A tqdm bar when stdout is a terminal; false = plain lines always.
    progress_bar: bool = True
    # W&B run notes (the run page's description), e.g. what this run tries; empty = none.
    notes: str = ""
    # Up to this many ranks, one W&B key per rank and figure (perf/step_seconds/rank3); above,
    # min / median / max over ranks and one perf/rank_table per report (the key count stays fixed).
    per_rank_keys_max_world_size: int = 8
    # Each checkpoint saved becomes a W&B artifact (a reference to its folder, config as metadata).
    log_checkpoints: bool = False

    def __post_init__(self) -> None:
        _check_choice("logger.mode", self.mode, LOGGER_MODES)
        _check_positive("logger.log_every", self.log_every)
        _check_positive("logger.init_timeout_s", self.init_timeout_s)
        if self.per_rank_keys_max_world_size < 0:
            raise ValueError(
                "logger.per_rank_keys_max_world_size must be >= 0, got "
                f"{self.per_rank_keys_max_world_size}"
            )


@dataclass
class TrainerConfig:
    """The loop."""

    steps: int = 1500
    # Samples per rank per step.
    batch_size: int = 1024
    # Evaluate every this many steps (and at the end); 0 = only at the end.
    eval_every: int = 500
    seed: int = 0
    # Dense-side arithmetic: fp32, bf16 (autocast; embeddings, optimizer state and loss stay
    # fp32), or auto = bf16 where the hardware multiplies bf16 natively (CUDA sm80+, CPUs
    # with AVX512-BF16 or AMX), else fp32.
    precision: str = "auto"
    # none | auto (the latest intact checkpoint of the run directory, if any) | a checkpoint path.
    resume: str = "none"
    # auto: with several ranks per host, each rank (its gloo and prefetch threads too) gets
    # its own share of the cores, near its GPU on GPU nodes, and runs as many intra-op
    # threads (train/cpu_affinity.py); none: the OS places them, OMP_NUM_THREADS sets threads.
    cpu_affinity: str = "auto"
    # Intra-op (OpenMP) threads per rank; null = auto: the physical cores this rank may use
    # (affinity mask, capped by a cgroup CPU quota) split among the ranks of its host that
    # share them, or OMP_NUM_THREADS where set (train/threads.py). Printed at the start.
    threads: Optional[int] = None
    # Seconds the process group's rendezvous and each collective may wait for a rank before
    # the job fails (NCCL's own default is 10 minutes); generous, as rank 0 alone may
    # preprocess data or write files while the others wait at the next collective.
    dist_timeout_s: float = 1800.0
    # Record a torch.profiler trace of a few steps on every rank into <run dir>/profile/
    # (train/profiling.py); off: no profiler at all.
    profile: bool = False
    # The steps profiled: [first global step, number of steps]; by default the 3 steps after
    # the 10 that throughput leaves out as warm-up.
    profile_steps: List[int] = field(default_factory=lambda: [10, 3])

    def __post_init__(self) -> None:
        _check_positive("trainer.steps", self.steps)
        if len(self.profile_steps) != 2 or self.profile_steps[0] < 0 or self.profile_steps[1] < 1:
            raise ValueError(
                f"trainer.profile_steps must be [first step >= 0, number of steps >= 1], got "
                f"{list(self.profile_steps)}"
            )
        if self.profile and sum(self.profile_steps) > self.steps:
            raise ValueError(
                f"trainer.profile_steps={list(self.profile_steps)} ends after trainer.steps="
                f"{self.steps}: profile steps {self.profile_steps[0]}.."
                f"{sum(self.profile_steps) - 1} of a run that has {self.steps}"
            )
        _check_positive("trainer.dist_timeout_s", self.dist_timeout_s)
        _check_positive("trainer.batch_size", self.batch_size)
        _check_choice("trainer.precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("trainer.cpu_affinity", self.cpu_affinity, ("auto", "none"))
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"trainer.threads must be >= 1 (or null: auto), got {self.threads}")
        if self.eval_every < 0:
            raise ValueError(f"trainer.eval_every must be >= 0, got {self.eval_every}")
        if not self.resume:
            raise ValueError("trainer.resume must be none, auto or a checkpoint path")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints under <run dir>/checkpoints (train/checkpoint.py)."""

    # Write a checkpoint every this many steps (0 = no periodic checkpoints).
    every_steps: int = 0
    # Also write one when training ends.
    at_end: bool = True
    # Complete checkpoints kept (older ones are deleted after a new one is complete).
    keep: int = 2
    # SIGTERM / SIGUSR2 (pre-emption): ranks vote every this many steps to save and stop;
    # with several ranks a signal is acted on at the second vote after it arrives (up to
    # twice this many steps), since each vote runs asynchronously during the next steps.
    signal_check_every: int = 5

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check_positive("checkpoint.keep", self.keep)
        _check_positive("checkpoint.signal_check_every", self.signal_check_every)


@dataclass
class PlanTopologyConfig:
    """A cluster to plan for with plan_only=true (it need not exist)."""

    # Ranks to plan for; null = plan for the launched ranks (and train unless plan_only).
    world_size: Optional[int] = None
    # Ranks per host.
    local_world_size: int = 8
    # cuda (tables in device memory, spilling to host) or cpu.
    compute_device: str = "cuda"
    # One GPU's memory (one GPU per rank) and one host's memory (shared by its
    # local_world_size ranks); sharding.hbm_cap_bytes / ddr_cap_bytes override the caps per
    # rank, as in a real job (train/memory_caps.py).
    device_memory_bytes: int = 80 * 1024**3
    host_memory_bytes: int = 2 * 1024**4

    def __post_init__(self) -> None:
        _check_choice("plan_topology.compute_device", self.compute_device, ("cuda", "cpu"))
        if self.world_size is not None:
            _check_positive("plan_topology.world_size", self.world_size)
        _check_positive("plan_topology.local_world_size", self.local_world_size)
        _check_positive("plan_topology.device_memory_bytes", self.device_memory_bytes)
        _check_positive("plan_topology.host_memory_bytes", self.host_memory_bytes)


@dataclass
class Config:
    """The whole job."""

    features: FeaturesConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    sharding: ShardingConfig = MISSING
    optim: OptimConfig = MISSING
    logger: LoggerConfig = MISSING
    hashing: HashingConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Plan the sharding, print it, and exit without training.
    plan_only: bool = False
    plan_topology: PlanTopologyConfig = field(default_factory=PlanTopologyConfig)

    def __post_init__(self) -> None:
        if self.plan_topology.world_size is not None and not self.plan_only:
            raise ValueError("plan_topology.world_size plans a cluster you do not have: set plan_only=true")
        if self.data.source == "criteo":
            check_criteo_features(self.data, self.features)


def check_criteo_features(data: DataConfig, features: FeaturesConfig) -> None:
    """Criteo data has 13 dense columns and categorical columns C1..C26: a feature set that
    names others fails here, before any process starts, naming the features= to pass."""
    names = [name for group in features.groups.values() for name in group.features]
    names += [f"t{index:03d}" for index in range(features.generated.num_tables)]
    missing = [name for name in names if name not in CRITEO_CATEGORICAL_NAMES]
    if not missing and features.num_dense_features == CRITEO_NUM_DENSE:
        return
    if missing:
        fix = (f"features={data.feature_set}" if data.feature_set
               else "a features= set named C1..C26")
        raise ValueError(
            f"data={data.name} is Criteo data, but features={features.name} names features "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''} that are not among its "
            f"categorical columns C1..C26: pass {fix}"
        )
    raise ValueError(
        f"data={data.name} is Criteo data with {CRITEO_NUM_DENSE} dense columns, but "
        f"features={features.name} has features.num_dense_features="
        f"{features.num_dense_features}: pass features.num_dense_features={CRITEO_NUM_DENSE}"
    )


def reject_unknown_keys(cfg: Any, where: str = "") -> None:
    """ValueError naming the first key of ``cfg`` (a composed DictConfig) that its schema
    dataclass has no field for.

    Hydra refuses ``trainer.stepz=3`` but adds ``+trainer.stepz=3`` (its own hint for that
    typo) past the schema, and OmegaConf.to_object then sets it as a stray attribute that
    nothing reads: the job would run as if the key were not there. Dict fields (a feature set's
    groups, sharding.tables) take any key; the dataclasses inside them are checked in turn.
    """
    from omegaconf import DictConfig, ListConfig

    if isinstance(cfg, DictConfig):
        if cfg._is_none() or cfg._is_missing():
            return
        schema = cfg._metadata.object_type
        fields = (
            {f.name for f in dataclasses.fields(schema)}
            if dataclasses.is_dataclass(schema)
            else None
        )
        for key in cfg.keys():
            path = f"{where}.{key}" if where else str(key)
            if fields is not None and key not in fields:
                raise ValueError(
                    f"unknown key {path} ({schema.__name__} has no field '{key}')"
                )
            reject_unknown_keys(cfg._get_node(key), path)
    elif isinstance(cfg, ListConfig) and not (cfg._is_none() or cfg._is_missing()):
        for index in range(len(cfg)):
            reject_unknown_keys(cfg._get_node(index), f"{where}[{index}]")


REPO_ROOT = Path(__file__).resolve().parents[1]


def register_configs() -> None:
    """Register the schema so conf/*.yaml files are validated against it, and the resolvers
    the YAML files use: ${hashrec_run_id:} (train/run_dir.py) and ${hashrec_repo:} (the
    repository root, for data shipped in it)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.hashrec_launcher.resuming_launcher import ResumingSlurmLauncher
    from train.run_dir import run_id

    # Hydra finds launchers by scanning the hydra_plugins namespace, which misses an editable
    # install; registering the class makes hydra/launcher=slurm work from any directory.
    Plugins.instance().register(ResumingSlurmLauncher)
    if not OmegaConf.has_resolver("hashrec_run_id"):
        OmegaConf.register_new_resolver("hashrec_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("hashrec_repo"):
        OmegaConf.register_new_resolver("hashrec_repo", lambda: str(REPO_ROOT))
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, node in (
        ("features", FeaturesConfig),
        ("model", ModelConfig),
        ("data", DataConfig),
        ("sharding", ShardingConfig),
        ("optim", OptimConfig),
        ("logger", LoggerConfig),
        ("hashing", HashingConfig),
    ):
        store.store(group=group, name=f"{group}_schema", node=node)
