"""Parquet files (one file, or a directory of them) as a data source."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from modules.batch import Batch
from modules.data_sources.parquet_columns import (
    check_schema,
    dense_column,
    id_bags,
    label_values,
    string_ids,
    transform_dense,
)
from modules.data_sources.parquet_statistics import measure_statistics
from modules.data_sources.source import check_feature_columns
from modules.features import FeatureGroupSpec, all_features
from modules.tabular import MISSING_ID, Bags, columns_to_batch, concatenate_columns, finite_dense_rows

__all__ = ["PADDING_LABEL", "ParquetSource", "string_ids"]

# The label of an eval row that only pads a batch (a rank with fewer eval rows than another
# runs the same batches, see ParquetSource): metrics leave such rows out.
PADDING_LABEL = -1.0
DENSE_TRANSFORMS = ("none", "log", "standardize")

# (file, row group, first row, end row): rows [first, end) of one row group.
Piece = tuple[Path, int, int, int]
Block = dict[str, "np.ndarray | Bags"]


def parquet_files(path: Path) -> list[Path]:
    """A single file, or a directory's ``*.parquet`` files in name order."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.parquet files")
    return files


def split_rows(row_groups: list[tuple[Path, int, int]], rank: int, world_size: int) -> list[Piece]:
    """Rank ``rank``'s contiguous share of all rows, [rank * N / W, (rank + 1) * N / W), as
    pieces of row groups: any number of row groups works with any number of ranks."""
    total = sum(rows for _, _, rows in row_groups)
    low, high = rank * total // world_size, (rank + 1) * total // world_size
    pieces, start = [], 0
    for path, index, rows in row_groups:
        first, end = max(low - start, 0), min(high - start, rows)
        if first < end:
            pieces.append((path, index, first, end))
        start += rows
    return pieces


def list_row_groups(
    path: Path, label: str, dense: list[str], categorical: list[str],
    lists: dict[str, bool] | None = None,
) -> tuple[list[tuple[Path, int, int]], dict[str, bool]]:
    """(file, row group, rows) of every non-empty row group of ``path`` (a file or a
    directory), with every file's schema checked against the declared columns, and whether
    each categorical column is a list column (the same in every file, and as in ``lists``
    when given). ValueError (one line, naming the file) for a bad schema or no rows at all."""
    import pyarrow.parquet as pq

    lists = dict(lists or {})
    groups = []
    for file in parquet_files(path):
        try:
            metadata = pq.ParquetFile(file).metadata
        except Exception as error:  # pyarrow's errors for a file that is not Parquet
            raise ValueError(f"{file}: not a readable Parquet file ({error})") from None
        for name, is_list in check_schema(
            file, metadata.schema.to_arrow_schema(), label, dense, categorical
        ).items():
            if lists.setdefault(name, is_list) != is_list:
                kinds = ("one value per row", "a list per row")
                raise ValueError(
                    f"{file}: categorical column {name} is {kinds[is_list]} here but "
                    f"{kinds[not is_list]} in other files"
                )
        groups += [
            (file, index, metadata.row_group(index).num_rows)
            for index in range(metadata.num_row_groups)
            if metadata.row_group(index).num_rows > 0
        ]
    if not groups:
        raise ValueError(f"{path}: no rows (empty Parquet file{'s' if path.is_dir() else ''})")
    return groups, lists


class ParquetSource:
    """Parquet files read by rows, each rank its own contiguous share of them.

    Train: rank r reads rows [r * N / W, (r + 1) * N / W) of the files in name order, cycling;
    its stream is the rows that survive bad-row dropping, cut into batches of B, so every rank
    has the same number of batches per step. Batch s is rows [s * B, (s + 1) * B) of that
    stream whatever step reading started at; a resume seeks to its first row. With
    ``shuffle_rows`` the stream is cut into windows of that many rows (a multiple of B) and
    each window's rows are permuted by a permutation drawn from (seed, rank, window), so a
    batch is still a pure function of (seed, rank, step) and a resume stays exact.

    Eval: rank r scores its share of the eval rows, every row exactly once: the ranks run the
    same number of batches (the largest over ranks), the last ones padded with rows labelled
    PADDING_LABEL (empty bags, zero dense) that the metrics leave out.

    Every file's schema is checked when the source is made (types, list against scalar,
    uint64) and every row group as it is read (labels not 0/1, negative IDs, null or
    non-finite dense values): one line naming file, row group, row and column.
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
        *,
        dense_null: str = "fail",
        dense_transform: str = "none",
        statistics: dict | None = None,
        shuffle_rows: int = 0,
        seed: int = 0,
    ) -> None:
        import pyarrow.parquet as pq  # only needed for this source

        self._pq = pq
        self.groups = groups
        self.batch_size = batch_size
        self.label_column = label_column
        self.dense_columns = dense_columns
        self.categorical_columns = categorical_columns
        self.skip_bad_rows = skip_bad_rows
        self.dense_null = dense_null
        if dense_transform not in DENSE_TRANSFORMS:
            raise ValueError(f"dense_transform={dense_transform!r} is not one of {DENSE_TRANSFORMS}")
        self.dense_transform = dense_transform
        self._statistics = statistics
        # Rows per shuffle window: a multiple of the batch size (0 = file order).
        self.shuffle_rows = math.ceil(shuffle_rows / batch_size) * batch_size if shuffle_rows else 0
        self.seed = seed
        # Rows this rank dropped for bad dense values, per piece: a piece read again (a new
        # epoch, a resumed stream) is not counted twice.
        self._skipped_per_row_group: dict[Piece, int] = {}
        self.skipped_rows_are_global = False
        # Rows of a piece that survive bad-row dropping, once known (from a full read, or
        # from its dense columns alone when seeking or counting eval batches).
        self._num_good_rows: dict[Piece, int] = {}
        # Eval batches every rank runs: each is a collective, so all ranks must run the same
        # count. Set by the caller to the largest ``num_local_eval_batches`` over ranks
        # (train/data.py, with a collective); None: eval_batches works it out alone.
        self.num_eval_batches: int | None = None
        check_feature_columns(groups, categorical_columns, f"parquet data {train_dir}")
        self.list_columns: dict[str, bool] = {}
        self.train_groups = self._row_groups(train_dir)
        self.eval_groups = self._row_groups(eval_dir)
        self._check_bags_match_features()

    @property
    def skipped_rows(self) -> int:
        return sum(self._skipped_per_row_group.values())

    @property
    def statistics(self) -> dict:
        """Measured once, from the train data, when the caller gave none."""
        if self._statistics is None:
            self._statistics = measure_statistics(
                self.train_groups, self.dense_columns, self.categorical_columns, 1_000_000
            )
        return self._statistics

    def _row_groups(self, path: Path) -> list[tuple[Path, int, int]]:
        groups, lists = list_row_groups(
            path, self.label_column, self.dense_columns, self.categorical_columns,
            self.list_columns,
        )
        self.list_columns.update(lists)
        return groups

    def _check_bags_match_features(self) -> None:
        """A feature declared with several IDs per sample (a feature YAML's ids_per_sample)
        expects a list column: a scalar column there is a mistake in the declaration."""
        for feature in all_features(self.groups):
            if feature.ids_per_sample > 1 and not self.list_columns.get(feature.name, True):
                raise ValueError(
                    f"feature {feature.name} declares ids_per_sample={feature.ids_per_sample} "
                    f"(a list per row), but its column holds one value per row"
                )

    def rank_pieces(self, split: str, rank: int, world_size: int) -> list[Piece]:
        """This rank's rows of ``split`` (train | eval) as row-group pieces."""
        groups = self.train_groups if split == "train" else self.eval_groups
        return split_rows(groups, rank, world_size)

    def _read_columns(self, path: Path, index: int, columns: list[str]):
        """One row group's ``columns`` as a pyarrow Table: every read of the data goes here."""
        return self._pq.ParquetFile(path).read_row_group(index, columns=columns)

    def _dense(self, table, where: str, first: int) -> dict[str, np.ndarray]:
        dense = {}
        for name in self.dense_columns:
            mean = self.statistics["dense"][name]["mean"] if self.dense_null == "mean" else None
            dense[name] = dense_column(table.column(name), where, name, self.dense_null, mean,
                                       self.skip_bad_rows, first)
        return dense

    def _good_dense_rows(self, dense: dict[str, np.ndarray], where: str, first: int) -> np.ndarray:
        matrix = np.stack([dense[name] for name in self.dense_columns], axis=1)
        good = finite_dense_rows(matrix, where, self.dense_columns, self.skip_bad_rows, first)
        return good

    def _read(self, path: Path, index: int, first: int = 0, end: int | None = None,
              record: bool = True) -> Block:
        """Rows [first, end) of a row group as numpy columns, checked; bad rows dropped
        (and counted when ``record``) with skip_bad_rows."""
        table = self._read_columns(
            path, index, [self.label_column, *self.dense_columns, *self.categorical_columns]
        )
        end = table.num_rows if end is None else end
        table = table.slice(first, end - first)
        where = f"{path.name} row group {index}"
        columns: Block = {}
        columns[self.label_column] = label_values(
            table.column(self.label_column), where, self.label_column, first
        )
        columns.update(self._dense(table, where, first))
        for name in self.categorical_columns:
            columns[name] = id_bags(table.column(name), where, name, first)
        if self.dense_columns:
            good = self._good_dense_rows(columns, where, first)  # type: ignore[arg-type]
            self._num_good_rows[(path, index, first, end)] = int(good.sum())
            if not good.all():
                if record:
                    self._skipped_per_row_group[(path, index, first, end)] = int((~good).sum())
                columns = {name: values[good] for name, values in columns.items()}
        return columns

    def check_first_row_groups(self) -> None:
        """Read and check the first row group of every file of both splits (before
        training: the labels, IDs and dense values a bad file most often shows at once)."""
        for groups in (self.train_groups, self.eval_groups):
            seen: set[Path] = set()
            for path, index, _ in groups:
                if path not in seen:
                    seen.add(path)
                    self._read(path, index, record=False)

    def _good_rows(self, piece: Piece) -> int:
        """Rows of a piece that survive bad-row dropping: all of them unless skip_bad_rows;
        else counted from its dense columns alone (read once, then cached)."""
        path, index, first, end = piece
        if not self.skip_bad_rows or not self.dense_columns:
            return end - first
        if piece not in self._num_good_rows:
            table = self._read_columns(path, index, self.dense_columns).slice(first, end - first)
            where = f"{path.name} row group {index}"
            good = self._good_dense_rows(self._dense(table, where, first), where, first)
            self._num_good_rows[piece] = int(good.sum())
        return self._num_good_rows[piece]

    def _seek(self, pieces: list[Piece], row: int) -> tuple[int, int]:
        """Where surviving row ``row`` of the stream cycling over ``pieces`` lies: (the
        position of its piece in the list, surviving rows of that piece before it).

        Batches are cut from the surviving rows, not from the rows in the files: every batch
        holds B real rows, each row of a cycle is seen once, and batch s is the same whichever
        step the stream started at. Metadata row counts are exact when no row is skipped;
        otherwise the pieces passed over have their dense columns read to count survivors
        (one cycle's pieces per process at most: counts are cached).
        """
        if row == 0:
            return 0, 0
        walked = 0
        while True:  # twice at most: the first cycle, then within a cycle of known length
            for position, piece in enumerate(pieces):
                good = self._good_rows(piece)
                num_rows = piece[3] - piece[2]
                if good < num_rows:  # counted as an uninterrupted run would have
                    self._skipped_per_row_group[piece] = num_rows - good
                if row < walked + good:
                    return position, row - walked
                walked += good
            if walked == 0:
                raise ValueError("parquet train data: no row survives on_bad_row=skip")
            row %= walked
            walked = 0

    def _chunks(
        self, pieces: list[Piece], size: int, cycle: bool, first: int = 0, skip_rows: int = 0
    ) -> Iterator[Block]:
        """Blocks of ``size`` surviving rows of ``pieces`` in order, from the one at position
        ``first`` less its first ``skip_rows`` surviving rows; round again when ``cycle``,
        else a last shorter block with the rows left."""
        if not pieces:
            return
        order: Iterator[int] = iter(range(first, len(pieces)))
        if cycle:
            order = itertools.chain(order, itertools.cycle(range(len(pieces))))
        buffer: list[Block] = []
        buffered = 0
        empty_in_a_row = 0  # a whole cycle of empty pieces would loop for ever
        for position in order:
            columns = self._read(*pieces[position])
            if skip_rows:
                columns = {name: values[skip_rows:] for name, values in columns.items()}
                skip_rows = 0
            num_rows = len(columns[self.label_column])
            empty_in_a_row = 0 if num_rows else empty_in_a_row + 1
            if empty_in_a_row > len(pieces):
                raise ValueError("parquet train data: no row survives on_bad_row=skip")
            buffer.append(columns)
            buffered += num_rows
            while buffered >= size:
                merged = {k: concatenate_columns([b[k] for b in buffer]) for k in buffer[0]}
                yield {k: v[:size] for k, v in merged.items()}
                buffer = [{k: v[size:] for k, v in merged.items()}]
                buffered -= size
        if buffered and not cycle:
            yield {k: concatenate_columns([b[k] for b in buffer]) for k in buffer[0]}

    def _transformed(self, dense: np.ndarray) -> np.ndarray:
        """Dense [N, D] float64 after data.dense_transform (statistics measured once)."""
        if self.dense_transform != "standardize":
            return transform_dense(dense, self.dense_transform, [])
        stats = [self.statistics["dense"][name] for name in self.dense_columns]
        return transform_dense(dense, self.dense_transform, stats)

    def _to_batch(self, columns: Block) -> Batch:
        num_rows = len(columns[self.label_column])
        dense = np.stack([columns[name] for name in self.dense_columns], axis=1) if (
            self.dense_columns) else np.zeros((num_rows, 0))
        categorical = {name: columns[name] for name in self.categorical_columns}
        return columns_to_batch(
            columns[self.label_column], self._transformed(dense), categorical, self.groups
        )

    def _padding(self, columns: Block | None, rows: int) -> Block:
        """``columns`` followed by ``rows`` padding rows (PADDING_LABEL, empty bags, 0s)."""
        pad: Block = {self.label_column: np.full(rows, PADDING_LABEL, np.float32)}
        for name in self.dense_columns:
            pad[name] = np.zeros(rows)
        for name in self.categorical_columns:
            pad[name] = (Bags(np.zeros(0, np.int64), np.zeros(rows, np.int32))
                         if self.list_columns.get(name) else np.full(rows, MISSING_ID, np.int64))
        if columns is None:
            return pad
        return {k: concatenate_columns([columns[k], pad[k]]) for k in columns}

    def train_batches(self, rank, world_size, start_step, stop_step):
        mine = self.rank_pieces("train", rank, world_size)
        if not mine:
            total = sum(rows for _, _, rows in self.train_groups)
            raise ValueError(f"{total} parquet train rows for {world_size} ranks")
        if start_step >= stop_step:
            return
        if not self.shuffle_rows:
            first, skip_rows = self._seek(mine, start_step * self.batch_size)
            chunks = self._chunks(mine, self.batch_size, cycle=True, first=first,
                                  skip_rows=skip_rows)
            yield from (self._to_batch(c) for c in itertools.islice(chunks, stop_step - start_step))
            return
        per_window = self.shuffle_rows // self.batch_size
        window = start_step // per_window
        first, skip_rows = self._seek(mine, window * self.shuffle_rows)
        windows = self._chunks(mine, self.shuffle_rows, cycle=True, first=first, skip_rows=skip_rows)
        step = window * per_window
        for rows in windows:
            order = np.random.default_rng([self.seed, rank, window]).permutation(self.shuffle_rows)
            for part in range(per_window):
                if step >= stop_step:
                    return
                if step >= start_step:
                    taken = order[part * self.batch_size : (part + 1) * self.batch_size]
                    yield self._to_batch({k: v[taken] for k, v in rows.items()})
                step += 1
            window += 1

    def num_local_eval_batches(self, rank: int, world_size: int) -> int:
        """Batches (the last one possibly partial) this rank needs to score each of its eval
        rows once, after bad rows are dropped (with skip_bad_rows this reads their dense
        columns, once). Not a collective: the caller takes the largest over ranks and sets
        ``num_eval_batches``."""
        rows = sum(self._good_rows(piece) for piece in self.rank_pieces("eval", rank, world_size))
        return math.ceil(rows / self.batch_size)

    def eval_batches(self, rank, world_size):
        count = self.num_eval_batches
        if count is None:  # every rank counts every rank's rows: the same answer everywhere
            count = max(self.num_local_eval_batches(r, world_size) for r in range(world_size))
        if count == 0:
            raise ValueError(
                "eval parquet data has no rows" + (" after dropping bad rows" if self.skip_bad_rows else "")
            )
        made = 0
        for rows in self._chunks(self.rank_pieces("eval", rank, world_size), self.batch_size,
                                 cycle=False):
            short = self.batch_size - len(rows[self.label_column])
            yield self._to_batch(self._padding(rows, short) if short else rows)
            made += 1
        for _ in range(count - made):  # this rank has fewer rows than the rank with most
            yield self._to_batch(self._padding(None, self.batch_size))
