"""Raw rows for scoring, streamed in blocks: Criteo text, preprocessed Criteo, Parquet.

Each reader yields ``Block``s of at most ``batch_size`` rows in input order, holding the
columns an exported model's schema names, and parses with the training readers
(``modules/criteo.py`` for Criteo text and shards, ``parquet_columns`` and
``finite_dense_rows`` for Parquet), so a row means at serving time what it meant in training. Memory is bounded by
the block: nothing reads a whole file.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from modules.criteo import CATEGORICAL_NAMES, CriteoColumns, ParsedBlock, open_text, parse_lines
from modules.data_sources.parquet_columns import (
    check_schema,
    dense_column,
    id_bags,
    label_values,
    transform_dense,
)
from modules.tabular import BadRowError, finite_dense_rows

CRITEO_TEXT_SUFFIXES = (".tsv", ".txt", ".gz", ".csv")


@dataclass
class Block:
    """dense float [B, N]; categorical: one int64 [B] column per schema feature (MISSING_ID
    = empty) or Bags (a list column); labels [B] or None; skipped: bad rows dropped before this block."""

    dense: np.ndarray
    categorical: list[np.ndarray]
    labels: np.ndarray | None
    skipped: int = 0


class Skipped:
    """Counts rows dropped with on_bad_row=skip."""

    def __init__(self) -> None:
        self.rows = 0


def _criteo_columns(block: ParsedBlock, feature_names: list[str]) -> list[np.ndarray]:
    index = {name: i for i, name in enumerate(CATEGORICAL_NAMES)}
    missing = [name for name in feature_names if name not in index]
    if missing:
        raise ValueError(f"the model's features {missing} are not Criteo columns")
    return [block.categorical[:, index[name]] for name in feature_names]


def criteo_text_blocks(
    files: list[Path], feature_names: list[str], batch_size: int, skip: bool, skipped: Skipped
) -> Iterator[Block]:
    for path in files:
        with open_text(path) as handle:
            line_number = 1
            while True:
                lines = list(itertools.islice(handle, batch_size))
                if not lines:
                    break
                parsed, dropped = parse_lines(iter(lines), str(path), line_number, skip)
                skipped.rows += dropped
                line_number += len(lines)
                if parsed.num_rows:
                    yield Block(parsed.dense, _criteo_columns(parsed, feature_names),
                                parsed.labels, dropped)


def criteo_shard_blocks(
    directory: Path, feature_names: list[str], batch_size: int
) -> Iterator[Block]:
    columns = CriteoColumns(directory)
    for start in range(0, columns.num_rows, batch_size):
        parsed = columns.rows(start, min(start + batch_size, columns.num_rows))
        yield Block(parsed.dense, _criteo_columns(parsed, feature_names), parsed.labels)


def parquet_blocks(
    files: list[Path],
    feature_names: list[str],
    dense_columns: list[str],
    label_column: str,
    batch_size: int,
    skip: bool,
    skipped: Skipped,
    rules: dict | None = None,
    dense_transform: str = "none",
) -> Iterator[Block]:
    """Parquet rows as training's reader converts them (``parquet_columns``): string, int and
    list IDs (a list column is a bag of IDs per row), negative IDs and uint64 refused, dense
    nulls by ``rules["dense_null"]``, then ``dense_transform`` with the run's statistics.
    ``rules``: the schema's ``parquet`` entry (None: a model exported before it was written,
    read as then: nulls 0, any column kind)."""
    import pyarrow.parquet as pq

    rules = rules or {}
    null = rules.get("dense_null", "zero")
    measured = rules.get("dense_statistics") or {}
    lists = rules.get("list_columns")
    for name in dense_columns:
        if (null == "mean" or dense_transform == "standardize") and name not in measured:
            raise ValueError(f"the model's schema has no statistics for dense column {name}")
    statistics = [measured.get(name) for name in dense_columns]
    for path in files:
        handle = pq.ParquetFile(path)
        names = set(handle.schema_arrow.names)
        has_label = label_column in names
        is_list = check_schema(path, handle.schema_arrow, label_column if has_label else None,
                               dense_columns, feature_names)
        for name in feature_names:
            if lists is not None and is_list[name] != (name in lists):
                kinds = ("one value per row", "a list per row")
                raise ValueError(f"{path}: categorical column {name} is {kinds[is_list[name]]}; "
                                 f"the model was trained on {kinds[name in lists]}")
        wanted = [*dense_columns, *feature_names] + ([label_column] if has_label else [])
        first_row = 0
        for record_batch in handle.iter_batches(batch_size=batch_size, columns=wanted):
            num_rows = record_batch.num_rows
            where = f"{path}: rows {first_row}-{first_row + num_rows - 1} (0-based)"
            categorical = [id_bags(record_batch.column(name), where, name, first_row)
                           for name in feature_names]
            dense = np.stack([
                dense_column(record_batch.column(name), where, name, null,
                             (measured.get(name) or {}).get("mean"), skip, first_row)
                for name in dense_columns
            ], axis=1) if dense_columns else np.zeros((num_rows, 0))
            # 0/1 as training checks them (never a null read as 0); uint8 as Criteo's.
            labels = (label_values(record_batch.column(label_column), where, label_column,
                                   first_row).astype(np.uint8) if has_label else None)
            good = finite_dense_rows(dense, where, dense_columns, skip, first_row)
            dropped = int((~good).sum())
            if dropped:
                skipped.rows += dropped
                dense = dense[good]
                categorical = [column[good] for column in categorical]
                labels = labels[good] if labels is not None else None
            first_row += num_rows
            if len(dense):
                dense = transform_dense(dense, dense_transform, statistics)
                yield Block(dense.astype(np.float32), categorical, labels, dropped)


def _parquet_transform(schema: dict) -> str:
    """The dense transform a Parquet input gets: the Parquet model's data.dense_transform;
    none for other models (their inputs' dense columns are taken as given)."""
    return schema.get("dense_transform", "none") if schema.get("parquet") else "none"


def read_blocks(
    path: Path, schema: dict, batch_size: int, skip: bool, skipped: Skipped
) -> Iterator[Block]:
    """Blocks of the input at ``path``: a Criteo text file (.tsv/.txt/.gz) or a folder of
    them, a preprocessed Criteo folder (manifest.json), or a Parquet file or folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file or folder")
    feature_names = [feature["name"] for feature in schema["features"]]
    if path.is_dir():
        if (path / "manifest.json").exists():
            return criteo_shard_blocks(path, feature_names, batch_size)
        parquet = sorted(path.glob("*.parquet"))
        text = sorted(p for p in path.iterdir() if p.name.endswith(CRITEO_TEXT_SUFFIXES))
        if parquet:
            return parquet_blocks(parquet, feature_names, schema["dense_columns"],
                                  schema["label_column"], batch_size, skip, skipped,
                                  schema.get("parquet"), _parquet_transform(schema))
        if text:
            return criteo_text_blocks(text, feature_names, batch_size, skip, skipped)
        raise FileNotFoundError(
            f"{path}: no *.parquet, Criteo text (.tsv/.txt/.gz) or manifest.json here"
        )
    if path.suffix == ".parquet":
        return parquet_blocks([path], feature_names, schema["dense_columns"],
                              schema["label_column"], batch_size, skip, skipped,
                              schema.get("parquet"), _parquet_transform(schema))
    if path.name.endswith(CRITEO_TEXT_SUFFIXES):
        return criteo_text_blocks([path], feature_names, batch_size, skip, skipped)
    raise BadRowError(
        f"{path}: unknown input kind (expected .parquet, .tsv, .txt, .gz or a folder)"
    )
