"""The hashing config -> one HashingSpec per feature.

Precedence for a feature's method: ``hashing.features.<name>.method``, then the feature's own
``hashing`` key in its feature set, then ``hashing.method``. Other fields: the per-feature
override, else the group's value. Rows: ``hashing.features.<name>.num_embeddings``, then
``hashing.compression_ratio``, then the feature's own ``num_embeddings``. With a memory budget
(``train/hashing/budget.py``) the features that none of these pins get the method and rows the
budget chose.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch

from modules.budget import BudgetShare
from modules.features import HashingSpec, check_hashing_option
from train.config import HashingConfig


class FrequencyFile:
    """Frequent IDs per feature, loaded once (``scripts/count_frequencies.py`` writes it)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._ids: dict[str, torch.Tensor] | None = None
        self._content: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._content is None:
            if not Path(self.path).is_file():  # type: ignore[arg-type]
                raise ValueError(
                    f"hashing.frequency_file={self.path}: no such file (write it with "
                    f"python scripts/count_frequencies.py <the job's overrides>)"
                )
            self._content = torch.load(self.path, weights_only=True)
        return self._content

    def counted(self, feature_name: str) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
        """(IDs most frequent first, their counts, all lookups counted or None where the file
        does not say) of a feature, or None when there is no file or it does not list it."""
        if not self.path:
            return None
        content = self._load()
        if feature_name not in content["ids"]:
            return None
        totals = content.get("totals", {})
        total = float(totals[feature_name]) if feature_name in totals else None
        return content["ids"][feature_name], content["counts"][feature_name], total

    def samples(self) -> int:
        """Samples the counts are over: meta samples, else steps x ranks x batch_size."""
        meta = self._load().get("meta", {})
        if "samples" in meta:
            return int(meta["samples"])
        if all(key in meta for key in ("steps", "ranks", "batch_size")):
            return int(meta["steps"]) * int(meta["ranks"]) * int(meta["batch_size"])
        raise ValueError(
            f"hashing.frequency_file={self.path}: its meta says neither samples nor steps, ranks "
            f"and batch_size, which turn counts into lookups per sample for the hashing budget "
            f"(scripts/count_frequencies.py writes them)"
        )

    def ids(self, feature_name: str, count: int | None, num_embeddings: int,
            share: float = 0.5) -> torch.Tensor:
        """The first ``count`` IDs; None = as many as listed, up to ``share`` of the rows and
        at most all rows but one (the other IDs are hashed into the rest)."""
        if not self.path:
            raise ValueError(
                f"feature {feature_name}: hashing method frequency needs hashing.frequency_file "
                f"(write one with scripts/count_frequencies.py)"
            )
        if self._ids is None:
            self._ids = self._load()["ids"]
        if feature_name not in self._ids:
            raise ValueError(
                f"hashing.frequency_file={self.path} has no counts for feature {feature_name}"
            )
        ids = self._ids[feature_name]
        if count is None:
            count = max(1, min(ids.numel(), int(num_embeddings * share), num_embeddings - 1))
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


def is_pinned(hashing: HashingConfig, name: str, feature_method: str | None) -> bool:
    """Whether the config itself sets the feature's method or rows (then a budget leaves
    them be): its feature config's hashing key, or hashing.features.<name>.method or
    .num_embeddings."""
    override = hashing.features.get(name)
    return feature_method is not None or (
        override is not None
        and (override.method is not None or override.num_embeddings is not None)
    )


def resolve_hashing(
    hashing: HashingConfig | None,
    name: str,
    id_space: int,
    num_embeddings: int,
    feature_method: str | None,
    frequency_file: FrequencyFile | None,
    budget_share: BudgetShare | None = None,
    ids_per_sample: int = 1,
) -> tuple[int, HashingSpec]:
    """(rows, spec) of one feature. ``hashing=None`` keeps the pre-hashing baseline: modulo.
    ``budget_share``: the method, rows and frequent IDs a memory budget chose for it."""
    if hashing is None:
        return num_embeddings, HashingSpec("modulo")
    override = hashing.features.get(name)

    def pick(key: str) -> Any:
        value = getattr(override, key) if override is not None else None
        return getattr(hashing, key) if value is None else value

    method = (override.method if override is not None else None) or feature_method or hashing.method
    if budget_share is not None:
        method, num_embeddings = budget_share.method, budget_share.rows
    check_hashing_option(f"feature {name}: hashing", "method", method)
    if hashing.compression_ratio is not None and method != "none":
        num_embeddings = max(1, math.ceil(id_space / hashing.compression_ratio))
    if override is not None and override.num_embeddings is not None:
        num_embeddings = override.num_embeddings
    frequent_ids = None
    if budget_share is not None:
        frequent_ids = budget_share.frequent_ids
    elif method == "frequency":
        frequent_ids = (frequency_file or FrequencyFile(None)).ids(
            name, pick("num_frequent"), num_embeddings, hashing.frequent_share
        )
    importance_rows = pick("importance_rows")
    if method == "multi_hash" and importance_rows == 0 and ids_per_sample == 1:
        importance_rows = math.ceil(hashing.importance_share * num_embeddings)
    spec = HashingSpec(
        method=method,
        num_hashes=pick("num_hashes"),
        combine=pick("combine") or "",
        importance_rows=importance_rows,
        q=pick("q"),
        frequent_ids=frequent_ids,
        seed=hashing.seed,
        eviction_policy=pick("eviction_policy"),
        eviction_interval=pick("eviction_interval"),
    )
    return num_embeddings, spec
