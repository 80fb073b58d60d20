"""Count raw-ID frequencies over a data stream, for the ``frequency`` hashing method.

The file maps each feature to its most frequent raw IDs, most frequent first (ties broken
by the smaller ID, so the file is deterministic), with their counts and the feature's IDs
counted in all (listed or not):
``{"ids": {feature: int64 [T]}, "counts": {feature: int64 [T]}, "totals": {feature: int},
"meta": {"samples": ..., ...}}``. ``scripts/count_frequencies.py`` writes it;
``hashing.frequency_file`` points to it. A hashing budget turns counts into lookups per sample
with ``meta["samples"]`` (else steps x ranks x batch_size); a file written from other logs
needs ids, counts and that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from modules.batch import Batch


def count_frequent_ids(batches: Iterable[Batch], top: int) -> dict[str, dict[str, Any]]:
    """The ``top`` most frequent raw IDs of every feature in ``batches``, with their counts,
    and every feature's IDs counted in all."""
    per_feature: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for batch in batches:
        for kjt in batch.sparse_features.values():
            for name, jagged in kjt.to_dict().items():
                ids, counts = torch.unique(jagged.values(), return_counts=True)
                per_feature.setdefault(name, []).append((ids, counts))
    result: dict[str, dict[str, Any]] = {"ids": {}, "counts": {}, "totals": {}}
    for name, parts in per_feature.items():
        ids, inverse = torch.unique(torch.cat([p[0] for p in parts]), return_inverse=True)
        counts = torch.zeros(ids.numel(), dtype=torch.int64).index_add_(
            0, inverse, torch.cat([p[1] for p in parts])
        )
        # ids are sorted ascending; a stable sort by descending count keeps smaller IDs first.
        order = torch.sort(counts, descending=True, stable=True).indices[:top]
        result["ids"][name] = ids[order].contiguous()
        result["counts"][name] = counts[order].contiguous()
        result["totals"][name] = int(counts.sum())
    return result


def save_frequency_file(path: str | Path, counted: dict[str, Any], meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**counted, "meta": meta}, path)
    return path
