"""Column blocks (labels, dense matrix, one raw-ID column per feature) -> Batch."""

from __future__ import annotations

import numpy as np
import torch

from modules.batch import Batch, host_kjt
from modules.features import FeatureGroupSpec

MISSING_ID = -1  # an empty categorical value: an empty bag, not an ID


class BadRowError(ValueError):
    """A malformed input row; the message names the file and the row."""


def finite_dense_rows(dense: np.ndarray, where: str, names: list[str], skip: bool) -> np.ndarray:
    """Boolean mask [N] of rows whose dense values are all finite.

    A NaN or infinite dense value poisons the loss and every weight it touches, so such a row
    either stops the job (``skip=False``: BadRowError naming ``where``, the row and column) or
    is dropped by the caller, who counts it (``skip=True``).

    Args:
        dense: float [N, D].
        where: file and block, e.g. ``part-0.parquet row group 3``.
    """
    finite = np.isfinite(dense)
    good = finite.all(axis=1)
    if not skip and not good.all():
        row, column = np.argwhere(~finite)[0]
        raise BadRowError(
            f"{where}, row {row}: dense feature {names[column]} is {dense[row, column]} "
            f"(use data.on_bad_row=skip to drop such rows)"
        )
    return good


def columns_to_batch(
    labels: np.ndarray,
    dense: np.ndarray,
    categorical: dict[str, np.ndarray],
    groups: list[FeatureGroupSpec],
) -> Batch:
    """Build a Batch from one-value-per-row categorical columns.

    Args:
        labels: [N] 0/1.
        dense: [N, num_dense] float32 (already transformed).
        categorical: feature name -> int64 [N] raw IDs, MISSING_ID where the value is absent
            (that sample's bag for the feature is empty: pooled to a zero vector).
    """
    sparse = {}
    num_rows = len(labels)
    for group in groups:
        values, lengths = [], []
        for feature in group.features:
            column = np.asarray(categorical[feature.name], dtype=np.int64)
            present = column != MISSING_ID
            values.append(torch.from_numpy(column[present]))
            lengths.append(torch.from_numpy(present.astype(np.int32)))
        # IDs per feature, counted here on the host (see host_kjt).
        sparse[group.name] = host_kjt(
            group.feature_names, torch.cat(values), torch.cat(lengths),
            [piece.numel() for piece in values], num_rows,
        )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=sparse,
        labels=torch.from_numpy(np.asarray(labels, dtype=np.float32)),
    )
