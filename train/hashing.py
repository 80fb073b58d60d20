"""The hashing config -> one HashingSpec per feature, and the per-feature hashing report.

Precedence for a feature's method: ``hashing.features.<name>.method``, then the feature's own
``hashing`` key in its feature set, then ``hashing.method``. Other fields: the per-feature
override, else the group's value.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from modules.batch import Batch
from modules.collisions import (
    distinct_signatures,
    feature_expected_collision_rate,
    measured_collision_rate,
)
from modules.features import FLOAT32_BYTES, FeatureGroupSpec, FeatureSpec
from modules.hashing import HashingSpec, feature_tables
from modules.id_mapping import HashingIdMapper
from modules.managed_collisions import MANAGED_STATE_BYTES_PER_ROW, admitted, mch_modules
from train.config import HASHING_METHODS, HashingConfig
from train.distributed import collective_device
from train.sharding import OPTIMIZER_STATE_VALUES_PER_ROW



class FrequencyFile:
    """Frequent IDs per feature, loaded once (``scripts/count_frequencies.py`` writes it)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._ids: dict[str, torch.Tensor] | None = None

    def ids(self, feature_name: str, count: int | None, num_embeddings: int) -> torch.Tensor:
        """The first ``count`` IDs; None = as many as listed, up to half the rows."""
        if not self.path:
            raise ValueError(
                f"feature {feature_name}: hashing method frequency needs hashing.frequency_file "
                f"(write one with scripts/count_frequencies.py)"
            )
        if self._ids is None:
            if not Path(self.path).is_file():
                raise ValueError(
                    f"hashing.frequency_file={self.path}: no such file (write it with "
                    f"python scripts/count_frequencies.py <the job's overrides>)"
                )
            content = torch.load(self.path, weights_only=True)
            self._ids = content["ids"]
        if feature_name not in self._ids:
            raise ValueError(
                f"hashing.frequency_file={self.path} has no counts for feature {feature_name}"
            )
        ids = self._ids[feature_name]
        if count is None:
            count = max(1, min(ids.numel(), num_embeddings // 2))
        if ids.numel() < count:
            raise ValueError(
                f"hashing.frequency_file={self.path} lists {ids.numel()} IDs for feature "
                f"{feature_name}, fewer than num_frequent={count}"
            )
        return ids[:count].clone()


def check_hashing_names(hashing: HashingConfig, feature_names: Iterable[str]) -> None:
    known = set(feature_names)
    unknown = sorted(set(hashing.features) - known)
    if unknown:
        raise ValueError(
            f"hashing.features names unknown features {unknown}; features are {sorted(known)}"
        )


def resolve_hashing(
    hashing: HashingConfig | None,
    name: str,
    id_space: int,
    num_embeddings: int,
    feature_method: str | None,
    frequency_file: FrequencyFile | None,
) -> tuple[int, HashingSpec]:
    """(rows, spec) of one feature. ``hashing=None`` keeps the pre-hashing baseline: modulo."""
    if hashing is None:
        return num_embeddings, HashingSpec("modulo")
    override = hashing.features.get(name)

    def pick(key: str) -> Any:
        value = getattr(override, key) if override is not None else None
        return getattr(hashing, key) if value is None else value

    method = (override.method if override is not None else None) or feature_method or hashing.method
    if method not in HASHING_METHODS:
        raise ValueError(
            f"feature {name}: hashing={method!r} is not one of {', '.join(HASHING_METHODS)}"
        )
    if hashing.compression_ratio is not None and method != "none":
        num_embeddings = max(1, math.ceil(id_space / hashing.compression_ratio))
    frequent_ids = None
    if method == "frequency":
        frequent_ids = (frequency_file or FrequencyFile(None)).ids(
            name, pick("num_frequent"), num_embeddings
        )
    spec = HashingSpec(
        method=method,
        num_hashes=pick("num_hashes"),
        combine=pick("combine") or "",
        importance_rows=pick("importance_rows"),
        q=pick("q"),
        frequent_ids=frequent_ids,
        seed=hashing.seed,
        eviction_policy=pick("eviction_policy"),
        eviction_interval=pick("eviction_interval"),
    )
    return num_embeddings, spec


def hashing_report(
    groups: list[FeatureGroupSpec],
    embedding_optimizer: str,
    eval_batches: Iterable[Batch],
    max_batches: int = 64,
    model: torch.nn.Module | None = None,
) -> dict[str, dict[str, Any]]:
    """Per feature: method, tables and rows, bytes (parameters + optimizer state) hashed and
    for a full table over the declared ID space, the expected collision rate for the declared
    cardinality and the one measured on the eval window (all ranks' eval batches, at most
    ``max_batches`` per rank, so a large real eval set is not read a second time in full).

    Managed features' rows depend on the model's live MCH maps: with ``model`` given they are
    measured against them (at the time of the call), else left unmeasured.

    A collective when distributed: every rank must call it with its own eval batches.
    """
    state_values = OPTIMIZER_STATE_VALUES_PER_ROW[embedding_optimizer]
    # Distinct raw IDs per feature over this rank's eval window.
    seen: dict[str, list[torch.Tensor]] = {}
    for batch in itertools.islice(eval_batches, max_batches):
        for kjt in batch.sparse_features.values():
            for name, jagged in kjt.to_dict().items():
                seen.setdefault(name, []).append(torch.unique(jagged.values().cpu()))
    local = {name: torch.unique(torch.cat(parts)) for name, parts in seen.items()}
    if dist.is_initialized() and dist.get_world_size() > 1:
        # The window is every rank's eval batches: gather the distinct IDs (small: a few
        # thousand per feature) once per report.
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, local)
        local = {
            name: torch.unique(torch.cat([part[name] for part in gathered if name in part]))
            for name in local
        }
    maps = mch_modules(model) if model is not None else {}
    report: dict[str, dict[str, Any]] = {}
    for group in groups:
        mapper = HashingIdMapper(list(group.features))
        for feature in group.features:
            distinct_ids = local.get(feature.name)
            if feature.hashing.method == "managed":
                distinct_ids = distinct_ids if feature.name in maps else None
            report[feature.name] = _feature_entry(
                feature, group.embedding_dim, state_values, mapper, distinct_ids,
                maps.get(feature.name),
            )
    return report


def _managed_rows(mapper: HashingIdMapper, feature: FeatureSpec, distinct_ids: torch.Tensor,
                  mch: torch.nn.Module) -> int:
    """Distinct rows that a managed feature's IDs reach now: one per ID holding a row of its
    own (in whichever rank's shard of the map), plus the shared rows of the others (one per
    shard, counted as used once there are at least as many such IDs). A collective."""
    hashed = mapper.feature_rows(feature.name, distinct_ids)[:, 0]
    owned = admitted(mch, hashed).to(torch.int64)
    num_shards = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        num_shards = dist.get_world_size()
        owned = owned.to(collective_device())
        dist.all_reduce(owned)  # each ID lives in at most one rank's shard
        owned = owned.cpu()
    num_owned = int((owned > 0).sum())
    return num_owned + min(num_shards, distinct_ids.numel() - num_owned)


def _feature_entry(
    feature: FeatureSpec,
    embedding_dim: int,
    state_values,
    mapper: HashingIdMapper,
    distinct_ids: torch.Tensor | None,
    mch: torch.nn.Module | None = None,
) -> dict[str, Any]:
    tables = feature_tables(feature, embedding_dim)
    bytes_hashed = sum(
        t.num_embeddings * (t.embedding_dim + state_values(t.embedding_dim)) * FLOAT32_BYTES
        for t in tables
    )
    if feature.hashing.method == "managed":  # the map: raw ID, row and eviction metadata
        bytes_hashed += feature.num_embeddings * MANAGED_STATE_BYTES_PER_ROW
    bytes_full = feature.id_space * (embedding_dim + state_values(embedding_dim)) * FLOAT32_BYTES
    entry: dict[str, Any] = {
        "method": feature.hashing.method,
        "id_space": feature.id_space,
        "tables": {t.name: t.num_embeddings for t in tables},
        "rows": sum(t.num_embeddings for t in tables),
        "buckets": sum(t.num_embeddings for t in tables),  # = rows, under the name other tools read
        "bytes_hashed": bytes_hashed,
        "bytes_full": bytes_full,
        "bytes_saved": bytes_full - bytes_hashed,
        "expected_collision_rate": feature_expected_collision_rate(feature),
        "eval_distinct_ids": 0,
        "eval_distinct_rows": 0,
        "measured_collision_rate": None,
        "expected_collision_rate_at_eval_ids": None,
    }
    if distinct_ids is not None and distinct_ids.numel() > 0:
        if feature.hashing.method == "none":
            distinct_ids = distinct_ids[(distinct_ids >= 0) & (distinct_ids < feature.num_embeddings)]
        if mch is not None:
            num_rows = _managed_rows(mapper, feature, distinct_ids, mch)
        else:
            num_rows = distinct_signatures(mapper.feature_rows(feature.name, distinct_ids))
        entry["eval_distinct_ids"] = int(distinct_ids.numel())
        entry["eval_distinct_rows"] = num_rows
        entry["measured_collision_rate"] = measured_collision_rate(distinct_ids.numel(), num_rows)
        entry["expected_collision_rate_at_eval_ids"] = feature_expected_collision_rate(
            feature, distinct_ids.numel()
        )
    return entry


def format_hashing(report: dict[str, dict[str, Any]]) -> str:
    """The report as a console table, one line per feature."""

    def size(num_bytes: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if abs(num_bytes) < 1024 or unit == "PiB":
                return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
            num_bytes /= 1024
        return ""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    header = (
        f"{'feature':<20} {'method':<10} {'id space':>14} {'rows':>12} {'bytes':>10} "
        f"{'full table':>10} {'exp. coll.':>10} {'eval ids':>9} {'coll.':>7} {'exp.':>7}"
    )
    lines = ["hashing (collisions: declared ID space; eval window measured vs expected)", header]
    lines.append("-" * len(header))
    for name, entry in report.items():
        lines.append(
            f"{name:<20} {entry['method']:<10} {entry['id_space']:>14,} {entry['rows']:>12,} "
            f"{size(entry['bytes_hashed']):>10} {size(entry['bytes_full']):>10} "
            f"{rate(entry['expected_collision_rate']):>10} {entry['eval_distinct_ids']:>9,} "
            f"{rate(entry['measured_collision_rate']):>7} "
            f"{rate(entry['expected_collision_rate_at_eval_ids']):>7}"
        )
    hashed = sum(entry["bytes_hashed"] for entry in report.values())
    full = sum(entry["bytes_full"] for entry in report.values())
    lines.append(f"total: {size(hashed)} hashed vs {size(full)} full tables ({full / max(1, hashed):,.0f}x smaller)")
    return "\n".join(lines)
