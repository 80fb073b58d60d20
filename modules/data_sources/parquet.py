"""A directory of Parquet files as a data source."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from modules.batch import Batch
from modules.data_sources.source import check_feature_columns
from modules.features import FeatureGroupSpec
from modules.tabular import MISSING_ID, columns_to_batch, finite_dense_rows


def string_ids(column) -> np.ndarray:
    """A pyarrow string column -> int64 raw IDs: the first 8 bytes of blake2b of the UTF-8
    text, as a non-negative int64, the same on every machine and run. Arrow's dictionary
    encoding finds the distinct values (in C++), so each is hashed once; nulls become
    MISSING_ID."""
    encoded = column.dictionary_encode().combine_chunks()
    hashed = np.array(
        [
            int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
            for text in encoded.dictionary.to_pylist()
        ],
        dtype=np.int64,
    )
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return np.where(indices >= 0, hashed[np.maximum(indices, 0)] if hashed.size else 0, MISSING_ID)


class ParquetSource:
    """A directory of Parquet files read by row group, round-robin over ranks.

    Train: rank r reads row groups r, r + world, ... of the sorted file list, in batches of
    B, cycling; every rank has the same number of batches per step because the stream never
    ends. A start step > 0 skips that many batches (deterministic, so a resume sees the same
    data). Eval: rank r takes its row groups of the eval directory and evaluates the first
    ``min over ranks`` full batches, so every rank runs the same count.
    """

    def __init__(
        self,
        train_dir: Path,
        eval_dir: Path,
        groups: list[FeatureGroupSpec],
        batch_size: int,
        label_column: str,
        dense_columns: list[str],
        categorical_columns: list[str],
        skip_bad_rows: bool = False,
    ) -> None:
        import pyarrow.parquet as pq  # only needed for this source

        self._pq = pq
        self.groups = groups
        self.batch_size = batch_size
        self.label_column = label_column
        self.dense_columns = dense_columns
        self.categorical_columns = categorical_columns
        self.skip_bad_rows = skip_bad_rows
        # Rows this rank dropped for non-finite dense values, per row group: a row group read
        # again (a new epoch, a resumed stream) is not counted twice.
        self._skipped_per_row_group: dict[tuple[Path, int], int] = {}
        self.skipped_rows_are_global = False
        check_feature_columns(groups, categorical_columns, f"parquet data {train_dir}")
        self.train_groups = self._row_groups(train_dir)
        self.eval_groups = self._row_groups(eval_dir)

    @property
    def skipped_rows(self) -> int:
        return sum(self._skipped_per_row_group.values())

    def _row_groups(self, directory: Path) -> list[tuple[Path, int, int]]:
        files = sorted(directory.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.parquet files")
        groups = []
        for path in files:
            metadata = self._pq.ParquetFile(path).metadata
            schema_names = set(metadata.schema.names)
            wanted = [self.label_column, *self.dense_columns, *self.categorical_columns]
            absent = [name for name in wanted if name not in schema_names]
            if absent:
                raise ValueError(f"{path}: columns {absent} are missing (has {sorted(schema_names)})")
            groups += [(path, index, metadata.row_group(index).num_rows) for index in range(metadata.num_row_groups)]
        return groups

    def _read(self, path: Path, index: int) -> dict[str, np.ndarray]:
        table = self._pq.ParquetFile(path).read_row_group(
            index, columns=[self.label_column, *self.dense_columns, *self.categorical_columns]
        )
        columns: dict[str, np.ndarray] = {}
        for name in table.column_names:
            column = table.column(name)
            if name in self.categorical_columns:
                if column.type == "string" or str(column.type) in ("string", "large_string"):
                    columns[name] = string_ids(column)
                else:
                    columns[name] = column.fill_null(MISSING_ID).to_numpy().astype(np.int64)
            else:
                columns[name] = column.fill_null(0).to_numpy(zero_copy_only=False)
        if self.dense_columns:
            dense = np.stack([columns[n].astype(np.float64) for n in self.dense_columns], axis=1)
            good = finite_dense_rows(
                dense, f"{path.name} row group {index}", self.dense_columns, self.skip_bad_rows
            )
            if not good.all():
                self._skipped_per_row_group[(path, index)] = int((~good).sum())
                columns = {name: values[good] for name, values in columns.items()}
        return columns

    def _batches(self, row_groups, cycle: bool) -> Iterator[Batch]:
        if not row_groups:
            return
        buffer: list[dict[str, np.ndarray]] = []
        buffered = 0
        while True:
            for path, index, _ in row_groups:
                buffer.append(self._read(path, index))
                buffered += len(buffer[-1][self.label_column])
                while buffered >= self.batch_size:
                    merged = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
                    yield self._to_batch({k: v[: self.batch_size] for k, v in merged.items()})
                    buffer = [{k: v[self.batch_size :] for k, v in merged.items()}]
                    buffered -= self.batch_size
            if not cycle:
                return

    def _to_batch(self, columns: dict[str, np.ndarray]) -> Batch:
        dense = np.stack([columns[name].astype(np.float32) for name in self.dense_columns], axis=1)
        categorical = {name: columns[name] for name in self.categorical_columns}
        return columns_to_batch(columns[self.label_column], dense, categorical, self.groups)

    def train_batches(self, rank, world_size, start_step, stop_step):
        mine = self.train_groups[rank::world_size]
        if not mine:
            raise ValueError(f"{len(self.train_groups)} parquet row groups for {world_size} ranks")
        stream = self._batches(mine, cycle=True)
        for step in range(stop_step):
            batch = next(stream)
            if step >= start_step:
                yield batch

    def eval_batches(self, rank, world_size):
        rows_per_rank = [
            sum(rows for _, _, rows in self.eval_groups[r::world_size]) for r in range(world_size)
        ]
        count = min(rows_per_rank) // self.batch_size
        if count == 0:
            raise ValueError(f"eval parquet data has too few rows for {world_size} ranks of batch {self.batch_size}")
        stream = self._batches(self.eval_groups[rank::world_size], cycle=False)
        for _ in range(count):
            yield next(stream)
