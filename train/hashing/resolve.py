"""The hashing config -> one HashingSpec per feature.

Precedence for a feature's method: ``hashing.features.<name>.method``, then the feature's own
``hashing`` key in its feature set, then ``hashing.method``. Other fields: the per-feature
override, else the group's value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch

from modules.features import HashingSpec, check_hashing_option
from train.config import HashingConfig


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
    check_hashing_option(f"feature {name}: hashing", "method", method)
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
