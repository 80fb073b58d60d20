"""hashing.budget_bytes in a job: the features -> what ``modules/budget.py`` allocates over
(traffic models, bytes per row), after the pinned features are paid for.

Traffic of a budgeted feature, per sample: from ``hashing.frequency_file`` where it lists the
feature (counts over the samples counted: the IDs are known, so the head gets rows of its
own); else, on planted data, the feature's declared Zipf law over its ID space (ranks only);
else (real data without counts) uniform over the ID space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modules.budget import (
    BudgetAllocation,
    BudgetedFeature,
    BudgetTooSmall,
    ListedTraffic,
    Traffic,
    UniformTraffic,
    ZipfTraffic,
    allocate,
)
from modules.features import FeatureSpec
from modules.id_mapping import FREQUENT_ID_BYTES
from train.config import Config, HashingConfig
from train.hashing.report import feature_bytes, row_bytes
from train.hashing.resolve import FrequencyFile, is_pinned
from train.sharding import OPTIMIZER_STATE_VALUES_PER_ROW


@dataclass(frozen=True)
class BudgetFacts:
    """What a budget needs beyond the feature set and the hashing config.

    Attributes:
        embedding_optimizer: its state per row is part of each row's bytes.
        world_size: ranks that hashing.budget_bytes_per_rank is multiplied by.
        planted: synthetic data, whose features' declared Zipf laws are the data's own.
    """

    embedding_optimizer: str
    world_size: int
    planted: bool


def budget_facts(config: Config, world_size: int) -> BudgetFacts:
    return BudgetFacts(config.optim.embedding, world_size, config.data.source == "synthetic")


def has_budget(hashing: HashingConfig | None) -> bool:
    return hashing is not None and (
        hashing.budget_bytes is not None or hashing.budget_bytes_per_rank is not None
    )


def budget_key(hashing: HashingConfig, world_size: int) -> tuple[str, int]:
    """(the config key as set, for messages; the budget in bytes for all ranks together)."""
    if hashing.budget_bytes is not None:
        return f"hashing.budget_bytes={hashing.budget_bytes}", int(hashing.budget_bytes)
    per_rank = int(hashing.budget_bytes_per_rank)
    return (
        f"hashing.budget_bytes_per_rank={per_rank} x {world_size} ranks",
        per_rank * world_size,
    )


@dataclass(frozen=True)
class DeclaredFeature:
    """One feature of a feature set before its hashing is resolved."""

    name: str
    group: str
    embedding_dim: int
    config: Any  # FeatureConfig or GeneratedTablesConfig (train/config.py)
    method: str | None  # the feature config's own hashing key


@dataclass
class BudgetChoice:
    """A budget and what it bought: the pinned features' bytes, then the allocation."""

    key: str
    budget_bytes: int
    fixed_bytes: dict[str, int]
    allocation: BudgetAllocation

    @property
    def used_bytes(self) -> int:
        return sum(self.fixed_bytes.values()) + self.allocation.bytes


def budgeted_features(
    hashing: HashingConfig, declared: list[DeclaredFeature]
) -> list[DeclaredFeature]:
    """The features the budget sizes: those whose method and rows the config leaves open."""
    chosen = [d for d in declared if not is_pinned(hashing, d.name, d.method)]
    for feature in chosen:
        override = hashing.features.get(feature.name)
        if override is not None and override.num_frequent is not None:
            raise ValueError(
                f"hashing.features.{feature.name}.num_frequent: the budget chooses the frequent "
                f"IDs of {feature.name}; pin it with hashing.features.{feature.name}.method="
                f"frequency and .num_embeddings to choose them yourself"
            )
    return chosen


def choose_within_budget(
    hashing: HashingConfig,
    facts: BudgetFacts,
    declared: list[DeclaredFeature],
    pinned: dict[str, FeatureSpec],
    frequency_file: FrequencyFile,
) -> BudgetChoice:
    """Pay for the ``pinned`` specs, then allocate the rest of the budget over the other
    declared features (``modules/budget.py``). ValueError, one line, when it cannot."""
    key, budget = budget_key(hashing, facts.world_size)
    state_values = OPTIMIZER_STATE_VALUES_PER_ROW[facts.embedding_optimizer]
    dims = {d.name: d.embedding_dim for d in declared}
    fixed = {
        name: feature_bytes(spec, dims[name], state_values) for name, spec in pinned.items()
    }
    fixed_total = sum(fixed.values())
    if fixed_total > budget:
        biggest = sorted(fixed.items(), key=lambda item: -item[1])[:3]
        raise ValueError(
            f"{key}: the features with pinned hashing alone take {fixed_total:,} bytes (largest: "
            f"{', '.join(f'{name} {size:,}' for name, size in biggest)}); raise the budget or "
            f"unpin them"
        )
    features = []
    for feature in budgeted_features(hashing, declared):
        one_row = row_bytes(feature.embedding_dim, state_values)
        features.append(BudgetedFeature(
            feature.name, _traffic(feature, facts, frequency_file), one_row,
            one_row + FREQUENT_ID_BYTES,
        ))
    if not features:
        return BudgetChoice(key, budget, fixed, BudgetAllocation(0.0, {}))
    try:
        allocation = allocate(features, budget - fixed_total)
    except BudgetTooSmall as error:
        raise ValueError(
            f"{key}: {error.budget_bytes:,} bytes are left after the {fixed_total:,} of the "
            f"features with pinned hashing, below the {error.minimum_bytes:,} of one row for "
            f"each of the {len(features)} budgeted features; a budget of at least "
            f"{fixed_total + error.minimum_bytes:,} bytes is needed"
        ) from None
    return BudgetChoice(key, budget, fixed, allocation)


def _traffic(
    feature: DeclaredFeature, facts: BudgetFacts, frequency_file: FrequencyFile
) -> Traffic:
    """The feature's lookups per sample per ID (see the module docstring)."""
    config = feature.config
    counted = frequency_file.counted(feature.name)
    if counted is not None:
        ids, counts, total = counted
        samples = frequency_file.samples()
        lookups = total if total is not None else float(config.ids_per_sample) * samples
        return ListedTraffic(ids, counts.to(torch.float64) / samples, lookups / samples,
                             config.id_space)
    if facts.planted:
        return ZipfTraffic(config.id_space, config.zipf_exponent, config.ids_per_sample)
    return UniformTraffic(config.id_space, config.ids_per_sample)
