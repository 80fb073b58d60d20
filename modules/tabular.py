"""Column blocks (labels, dense matrix, one raw-ID column or bag column per feature) -> Batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from modules.batch import Batch, host_kjt
from modules.features import FeatureGroupSpec

MISSING_ID = -1  # an empty categorical value: an empty bag, not an ID


@dataclass
class Bags:
    """A column of ID bags (multi-ID features: genres, query terms, recent items) for N rows.

    Attributes:
        values: int64 [sum(lengths)], row after row.
        lengths: int32 [N]; 0 = an empty bag (a null or empty list).
    """

    values: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, rows: np.ndarray) -> "Bags":
        """The bags of ``rows`` (int [M] positions, any order) as a new Bags."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])[rows]
        lengths = self.lengths[rows]
        total = int(lengths.sum())
        # Position i of the output reads values[start of its row + i - first output of its row].
        first_out = np.cumsum(lengths, dtype=np.int64) - lengths
        index = np.repeat(starts - first_out, lengths) + np.arange(total, dtype=np.int64)
        return Bags(self.values[index], lengths)

    def __getitem__(self, rows) -> "Bags":
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        elif np.asarray(rows).dtype == bool:
            rows = np.flatnonzero(rows)
        return self.take(rows)

    @staticmethod
    def concatenate(parts: list["Bags"]) -> "Bags":
        return Bags(
            np.concatenate([p.values for p in parts]).astype(np.int64, copy=False),
            np.concatenate([p.lengths for p in parts]).astype(np.int32, copy=False),
        )


def concatenate_columns(parts: list) -> "np.ndarray | Bags":
    """Row blocks of one column (numpy arrays or Bags), one after the other."""
    if isinstance(parts[0], Bags):
        return Bags.concatenate(parts)
    return np.concatenate(parts)


class BadRowError(ValueError):
    """A malformed input row; the message names the file and the row."""


def finite_dense_rows(
    dense: np.ndarray, where: str, names: list[str], skip: bool, row_offset: int = 0
) -> np.ndarray:
    """Boolean mask [N] of rows whose dense values are all finite.

    A NaN or infinite dense value poisons the loss and every weight it touches, so such a row
    either stops the job (``skip=False``: BadRowError naming ``where``, the row and column) or
    is dropped by the caller, who counts it (``skip=True``).

    Args:
        dense: float [N, D].
        where: file and block, e.g. ``part-0.parquet row group 3``.
        row_offset: the block's first row within ``where`` (row numbers in messages).
    """
    finite = np.isfinite(dense)
    good = finite.all(axis=1)
    if not skip and not good.all():
        row, column = np.argwhere(~finite)[0]
        raise BadRowError(
            f"{where}, row {row + row_offset}: dense feature {names[column]} is {dense[row, column]} "
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
            (that sample's bag for the feature is empty: pooled to a zero vector), or Bags
            (several IDs per row).
    """
    sparse = {}
    num_rows = len(labels)
    for group in groups:
        values, lengths = [], []
        for feature in group.features:
            column = categorical[feature.name]
            if isinstance(column, Bags):
                values.append(torch.from_numpy(np.ascontiguousarray(column.values, np.int64)))
                lengths.append(torch.from_numpy(np.ascontiguousarray(column.lengths, np.int32)))
                continue
            column = np.asarray(column, dtype=np.int64)
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
