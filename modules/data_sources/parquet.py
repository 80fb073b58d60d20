"""A directory of Parquet files as a data source."""

from __future__ import annotations

import hashlib
import itertools
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


def numeric(column) -> np.ndarray:
    """A pyarrow numeric column -> numpy, nulls as 0."""
    return column.fill_null(0).to_numpy(zero_copy_only=False)


class ParquetSource:
    """A directory of Parquet files read by row group, round-robin over ranks.

    Train: rank r reads row groups r, r + world, ... of the sorted file list, cycling; its
    stream is the rows that survive bad-row dropping, in that order, cut into batches of B;
    every rank has the same number of batches per step because the stream never ends. Batch s
    of a rank is rows [s * B, (s + 1) * B) of that stream whatever step reading started at, so
    a resume or a new segment after an eval sees the same batches as an uninterrupted run; it
    seeks to its first row instead of reading the earlier ones. Eval: rank r takes its row
    groups of the eval directory and evaluates the first ``num_eval_batches`` full batches,
    the same count on every rank.
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
        # Rows of a row group that survive bad-row dropping, once known (from a full read, or
        # from its dense columns alone when seeking or counting eval batches).
        self._num_good_rows: dict[tuple[Path, int], int] = {}
        # Eval batches every rank runs: each is a collective, so all ranks must run the same
        # count. Set by the caller to the smallest ``num_local_eval_batches`` over ranks
        # (train/data.py, with a collective); None: eval_batches works it out alone, reading
        # the dense columns of every rank's eval row groups.
        self.num_eval_batches: int | None = None
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

    def _good_dense_rows(
        self, columns: dict[str, np.ndarray], path: Path, index: int
    ) -> np.ndarray:
        """Boolean mask [N]: rows of a row group whose dense values (``columns``, from
        ``numeric``) are all finite; raises on a bad row unless skip_bad_rows."""
        dense = np.stack([columns[name].astype(np.float64) for name in self.dense_columns], axis=1)
        good = finite_dense_rows(
            dense, f"{path.name} row group {index}", self.dense_columns, self.skip_bad_rows
        )
        self._num_good_rows[(path, index)] = int(good.sum())
        return good

    def _read_columns(self, path: Path, index: int, columns: list[str]):
        """One row group's ``columns`` as a pyarrow Table: every read of the data goes here."""
        return self._pq.ParquetFile(path).read_row_group(index, columns=columns)

    def _read(self, path: Path, index: int) -> dict[str, np.ndarray]:
        table = self._read_columns(
            path, index, [self.label_column, *self.dense_columns, *self.categorical_columns]
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
                columns[name] = numeric(column)
        if self.dense_columns:
            good = self._good_dense_rows(columns, path, index)
            if not good.all():
                self._skipped_per_row_group[(path, index)] = int((~good).sum())
                columns = {name: values[good] for name, values in columns.items()}
        return columns

    def _good_rows(self, path: Path, index: int, num_rows: int) -> int:
        """Rows of a row group that survive bad-row dropping: all ``num_rows`` unless
        skip_bad_rows; else counted from its dense columns alone (read once, then cached)."""
        if not self.skip_bad_rows or not self.dense_columns:
            return num_rows
        if (path, index) not in self._num_good_rows:
            table = self._read_columns(path, index, self.dense_columns)
            dense = {name: numeric(table.column(name)) for name in self.dense_columns}
            self._good_dense_rows(dense, path, index)
        return self._num_good_rows[(path, index)]

    def _seek(self, row_groups: list[tuple[Path, int, int]], row: int) -> tuple[int, int]:
        """Where surviving row ``row`` of the stream cycling over ``row_groups`` lies: (the
        position of its row group in the list, surviving rows of that group before it).

        Batches are cut from the surviving rows, not from the rows in the files: every batch
        holds B real rows, each row of a cycle is seen once, and batch s is the same whichever
        step the stream started at (a resume sees an uninterrupted run's batches). Boundaries
        over the files' rows would need no reading to seek, but a batch would then lose its
        bad rows (short batches) or borrow the next batch's (rows seen twice). The price:
        metadata row counts are exact only when no row is skipped; otherwise the row groups
        passed over have their dense columns read to count survivors, far cheaper than the
        full read (every categorical column decoded and hashed). That is one cycle's row groups
        per process at most (every cycle repeats the first; counts are cached), so the next
        segment after an eval reads nothing to seek, and a resume reads only dense columns.
        """
        if row == 0:
            return 0, 0
        walked = 0
        while True:  # twice at most: the first cycle, then within a cycle of known length
            for position, (path, index, num_rows) in enumerate(row_groups):
                good = self._good_rows(path, index, num_rows)
                if good < num_rows:  # counted as an uninterrupted run would have
                    self._skipped_per_row_group[(path, index)] = num_rows - good
                if row < walked + good:
                    return position, row - walked
                walked += good
            if walked == 0:
                raise ValueError("parquet train data: no row survives on_bad_row=skip")
            row %= walked
            walked = 0

    def _batches(
        self, row_groups, cycle: bool, first: int = 0, skip_rows: int = 0
    ) -> Iterator[Batch]:
        """Batches of B surviving rows of ``row_groups`` in order, from the one at position
        ``first`` less its first ``skip_rows`` surviving rows; round again when ``cycle``."""
        if not row_groups:
            return
        order: Iterator[int] = iter(range(first, len(row_groups)))
        if cycle:
            order = itertools.chain(order, itertools.cycle(range(len(row_groups))))
        buffer: list[dict[str, np.ndarray]] = []
        buffered = 0
        empty_in_a_row = 0  # a whole cycle of empty row groups would loop for ever
        for position in order:
            path, index, _ = row_groups[position]
            columns = self._read(path, index)
            if skip_rows:
                columns = {name: values[skip_rows:] for name, values in columns.items()}
                skip_rows = 0
            num_rows = len(columns[self.label_column])
            empty_in_a_row = 0 if num_rows else empty_in_a_row + 1
            if empty_in_a_row > len(row_groups):
                raise ValueError("parquet train data: no row survives on_bad_row=skip")
            buffer.append(columns)
            buffered += num_rows
            while buffered >= self.batch_size:
                merged = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
                yield self._to_batch({k: v[: self.batch_size] for k, v in merged.items()})
                buffer = [{k: v[self.batch_size :] for k, v in merged.items()}]
                buffered -= self.batch_size

    def _to_batch(self, columns: dict[str, np.ndarray]) -> Batch:
        dense = np.stack([columns[name].astype(np.float32) for name in self.dense_columns], axis=1)
        categorical = {name: columns[name] for name in self.categorical_columns}
        return columns_to_batch(columns[self.label_column], dense, categorical, self.groups)

    def train_batches(self, rank, world_size, start_step, stop_step):
        mine = self.train_groups[rank::world_size]
        if not mine:
            raise ValueError(f"{len(self.train_groups)} parquet row groups for {world_size} ranks")
        if start_step >= stop_step:
            return
        first, skip_rows = self._seek(mine, start_step * self.batch_size)
        stream = self._batches(mine, cycle=True, first=first, skip_rows=skip_rows)
        yield from itertools.islice(stream, stop_step - start_step)

    def num_local_eval_batches(self, rank: int, world_size: int) -> int:
        """Full batches in this rank's eval row groups after bad rows are dropped (with
        skip_bad_rows this reads their dense columns, once). Not a collective: the caller
        takes the smallest over ranks and sets ``num_eval_batches``."""
        mine = self.eval_groups[rank::world_size]
        return sum(self._good_rows(*group) for group in mine) // self.batch_size

    def eval_batches(self, rank, world_size):
        count = self.num_eval_batches
        if count is None:  # every rank counts every rank's rows: the same answer everywhere
            count = min(self.num_local_eval_batches(r, world_size) for r in range(world_size))
        if count == 0:
            raise ValueError(
                f"eval parquet data has too few rows for {world_size} ranks of batch "
                f"{self.batch_size}" + (" after dropping bad rows" if self.skip_bad_rows else "")
            )
        stream = self._batches(self.eval_groups[rank::world_size], cycle=False)
        yield from itertools.islice(stream, count)
