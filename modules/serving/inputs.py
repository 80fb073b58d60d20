"""Turning the training data readers' output into the serving model's three tensors."""

from __future__ import annotations

import numpy as np
import torch

from modules.batch import Batch
from modules.tabular import MISSING_ID, Bags


def batch_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense [B, N], values, lengths [F * B]) of a training Batch; its groups' KJTs are in
    the model's group order, so the features come out in schema order."""
    kjts = list(batch.sparse_features.values())
    return (
        batch.dense_features.float(),
        torch.cat([kjt.values() for kjt in kjts]).to(torch.int64),
        torch.cat([kjt.lengths() for kjt in kjts]).to(torch.int32),
    )


def column_inputs(
    dense: np.ndarray, categorical: list["np.ndarray | Bags"]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, values, lengths) from a dense matrix [B, N] and one int64 raw-ID column [B]
    (MISSING_ID: an empty bag, as in training, ``modules/tabular.py``) or one ``Bags`` (a
    list column: several IDs per sample) per feature in schema order."""
    values, lengths = [], []
    for column in categorical:
        if isinstance(column, Bags):
            values.append(torch.from_numpy(np.asarray(column.values, dtype=np.int64)))
            lengths.append(torch.from_numpy(np.asarray(column.lengths, dtype=np.int32)))
            continue
        column = np.asarray(column, dtype=np.int64)
        present = column != MISSING_ID
        values.append(torch.from_numpy(column[present]))
        lengths.append(torch.from_numpy(present.astype(np.int32)))
    return (
        torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int32),
    )
