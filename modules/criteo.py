"""Criteo click logs: parse the raw text format, write and read columnar shards.

Raw format (Criteo Display Advertising Challenge / Criteo 1TB): one sample per line,
tab-separated, 40 fields: the label (0/1), 13 integer features I1..I13 (may be empty), 26
categorical features C1..C26 as hex strings (may be empty).

Shards are plain numpy files, one per column block, read with ``mmap``: a batch is a slice of
the memory-mapped arrays, with no decoding at read time (Parquet would decode and decompress
every row group). Categorical values are kept as their integer values (raw IDs, no
vocabulary pass); the model's hashing decides table sizes. A missing categorical becomes an
empty bag (length 0) in the batch; a missing integer becomes 0 before the log transform.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from modules.tabular import MISSING_ID, BadRowError

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL
CATEGORICAL_NAMES = [f"C{index}" for index in range(1, NUM_CATEGORICAL + 1)]
SHARD_SUFFIXES = ("labels", "dense", "categorical")


@dataclass
class ParsedBlock:
    """Columns of a block of rows: labels [N] uint8, dense [N, 13] float32 (log-transformed),
    categorical [N, 26] int64 (raw IDs, MISSING_ID where empty)."""

    labels: np.ndarray
    dense: np.ndarray
    categorical: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])


def open_text(path: Path) -> IO[str]:
    """Plain or gzip text, by suffix."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def dense_transform(values: np.ndarray) -> np.ndarray:
    """The DLRM reference transform: negatives to 0, then log(x + 1)."""
    return np.log1p(np.maximum(values, 0)).astype(np.float32)


def parse_line(line: str, where: str) -> tuple[int, list[int], list[int]]:
    """One raw line -> (label, 13 integers, 26 raw IDs). ``where`` is ``file:line``."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != NUM_FIELDS:
        raise BadRowError(f"{where}: expected {NUM_FIELDS} tab-separated fields, got {len(fields)}")
    label_text = fields[0]
    if label_text not in ("0", "1"):
        raise BadRowError(f"{where}: label must be 0 or 1, got {label_text!r}")
    dense = []
    for index, text in enumerate(fields[1 : 1 + NUM_DENSE], start=1):
        if not text:
            dense.append(0)
            continue
        try:
            dense.append(int(text))
        except ValueError:
            raise BadRowError(f"{where}: integer feature I{index} is not an integer: {text!r}") from None
    categorical = []
    for index, text in enumerate(fields[1 + NUM_DENSE :], start=1):
        if not text:
            categorical.append(MISSING_ID)
            continue
        try:
            categorical.append(int(text, 16))
        except ValueError:
            raise BadRowError(f"{where}: categorical feature C{index} is not hex: {text!r}") from None
    return int(label_text), dense, categorical


def parse_lines(
    lines: Iterator[str], source: str, first_line_number: int, skip_bad_rows: bool
) -> tuple[ParsedBlock, int]:
    """Parse lines into a block; returns (block, number of bad rows skipped)."""
    labels, dense_rows, categorical_rows = [], [], []
    skipped = 0
    for offset, line in enumerate(lines):
        try:
            label, dense, categorical = parse_line(line, f"{source}:{first_line_number + offset}")
        except BadRowError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        labels.append(label)
        dense_rows.append(dense)
        categorical_rows.append(categorical)
    block = ParsedBlock(
        labels=np.asarray(labels, dtype=np.uint8),
        dense=dense_transform(np.asarray(dense_rows, dtype=np.float64).reshape(-1, NUM_DENSE)),
        categorical=np.asarray(categorical_rows, dtype=np.int64).reshape(-1, NUM_CATEGORICAL),
    )
    return block, skipped


def shard_paths(directory: Path, stem: str) -> dict[str, Path]:
    return {suffix: directory / f"{stem}.{suffix}.npy" for suffix in SHARD_SUFFIXES}


def write_shard(directory: Path, stem: str, block: ParsedBlock) -> None:
    """Write the three column files of one shard, each atomically (temp name, then rename)."""
    for suffix, path in shard_paths(directory, stem).items():
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, getattr(block, suffix))
        os.replace(tmp, path)


@dataclass
class SplitManifest:
    """What the preprocessing wrote for one split: shard stems in order, rows, bad rows."""

    shards: list[str]
    rows: int
    skipped_rows: int

    @staticmethod
    def path(directory: Path) -> Path:
        return directory / "manifest.json"

    def save(self, directory: Path) -> None:
        tmp = self.path(directory).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(vars(self), indent=2))
        os.replace(tmp, self.path(directory))

    @classmethod
    def load(cls, directory: Path) -> "SplitManifest":
        path = cls.path(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{directory}: no preprocessed Criteo split here (missing {path.name}); run "
                f"scripts/preprocess_criteo.py first"
            )
        return cls(**json.loads(path.read_text()))


class CriteoColumns:
    """All shards of one split, memory-mapped and addressed by global row index."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        manifest = SplitManifest.load(directory)
        self.skipped_rows = manifest.skipped_rows
        self._labels, self._dense, self._categorical = [], [], []
        for stem in manifest.shards:
            paths = shard_paths(directory, stem)
            self._labels.append(np.load(paths["labels"], mmap_mode="r"))
            self._dense.append(np.load(paths["dense"], mmap_mode="r"))
            self._categorical.append(np.load(paths["categorical"], mmap_mode="r"))
        self._starts = np.cumsum([0] + [len(labels) for labels in self._labels])
        self.num_rows = int(self._starts[-1])
        if self.num_rows == 0:
            raise ValueError(f"{directory}: the preprocessed split has no rows")

    def rows(self, start: int, stop: int) -> ParsedBlock:
        """Rows [start, stop) (stop <= num_rows), possibly spanning shards."""
        pieces = []
        position = start
        while position < stop:
            shard = int(np.searchsorted(self._starts, position, side="right") - 1)
            local = position - int(self._starts[shard])
            take = min(stop - position, int(self._starts[shard + 1]) - position)
            pieces.append(
                (
                    self._labels[shard][local : local + take],
                    self._dense[shard][local : local + take],
                    self._categorical[shard][local : local + take],
                )
            )
            position += take
        return ParsedBlock(
            labels=np.concatenate([p[0] for p in pieces]),
            dense=np.concatenate([p[1] for p in pieces]),
            categorical=np.concatenate([p[2] for p in pieces]),
        )

    def wrapped_rows(self, start: int, count: int) -> ParsedBlock:
        """``count`` rows from ``start``, wrapping around the end (epochs)."""
        start %= self.num_rows
        blocks = []
        while count > 0:
            take = min(count, self.num_rows - start)
            blocks.append(self.rows(start, start + take))
            count -= take
            start = 0
        if len(blocks) == 1:
            return blocks[0]
        return ParsedBlock(
            labels=np.concatenate([b.labels for b in blocks]),
            dense=np.concatenate([b.dense for b in blocks]),
            categorical=np.concatenate([b.categorical for b in blocks]),
        )


def num_eval_batches(num_rows: int, world_size: int, batch_size: int) -> int:
    """Batches each rank evaluates so that the ranks together cover every row once."""
    return math.ceil(math.ceil(num_rows / world_size) / batch_size)
