"""Preprocessed Criteo shards as a data source."""

from __future__ import annotations

from pathlib import Path

from modules.batch import Batch
from modules.criteo import CATEGORICAL_NAMES, NUM_DENSE, CriteoColumns
from modules.data_sources.source import check_feature_columns
from modules.features import FeatureGroupSpec, all_features
from modules.tabular import columns_to_batch


class CriteoSource:
    """Preprocessed Criteo shards (scripts/preprocess_criteo.py), memory-mapped.

    Train: step s of rank r reads rows [(s * world + r) * B, +B) of the train split, wrapping
    around at the end (epochs), so a batch is a pure function of (step, rank). Eval: the
    held-out split is cut into ``world`` equal slices (dropping at most world-1 rows), each
    rank evaluating its slice in batches of B.
    """

    def __init__(
        self, train_dir: Path, eval_dir: Path, groups: list[FeatureGroupSpec], batch_size: int,
        num_dense_features: int,
    ) -> None:
        if num_dense_features != NUM_DENSE:
            raise ValueError(
                f"Criteo data has {NUM_DENSE} dense features; features.num_dense_features is "
                f"{num_dense_features}"
            )
        check_feature_columns(groups, CATEGORICAL_NAMES, "Criteo data")
        self.train = CriteoColumns(train_dir)
        self.eval = CriteoColumns(eval_dir)
        self.groups = groups
        self.batch_size = batch_size
        # Counted once for the whole split by the preprocessing.
        self.skipped_rows = self.train.skipped_rows + self.eval.skipped_rows
        self.skipped_rows_are_global = True
        self._columns = {name: index for index, name in enumerate(CATEGORICAL_NAMES)}

    def _batch(self, block) -> Batch:
        categorical = {
            f.name: block.categorical[:, self._columns[f.name]] for f in all_features(self.groups)
        }
        return columns_to_batch(block.labels, block.dense, categorical, self.groups)

    def train_batches(self, rank, world_size, start_step, stop_step):
        for step in range(start_step, stop_step):
            start = (step * world_size + rank) * self.batch_size
            yield self._batch(self.train.wrapped_rows(start, self.batch_size))

    def eval_batches(self, rank, world_size):
        per_rank = self.eval.num_rows // world_size
        if per_rank == 0:
            raise ValueError(
                f"{self.eval.directory}: {self.eval.num_rows} eval rows for {world_size} ranks"
            )
        first = rank * per_rank
        for start in range(first, first + per_rank, self.batch_size):
            yield self._batch(self.eval.rows(start, min(start + self.batch_size, first + per_rank)))
