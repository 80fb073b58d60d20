"""What a Parquet column may hold for hashrec, and its conversion to numpy.

Checked twice: every file's schema before training (``check_schema``: types, list against
scalar, uint64), and every row group as it is read (``label_values``, ``id_bags``,
``dense_values``: labels not 0/1, negative IDs, null dense values), naming the file, row
group, row and column in one line (a ``BadRowError``).

Categorical columns hold int IDs (int8..int64, uint8..uint32) or strings, one per row, or a
list of them per row (a bag: genres, query terms, recent items). A null is a missing value (an
empty bag); a negative integer ID is an error, not a missing value. uint64 is refused: half
its range does not fit int64 raw IDs, and mapping it silently would merge IDs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from modules.tabular import MISSING_ID, Bags, BadRowError

DENSE_NULLS = ("fail", "zero", "mean")


def string_ids(column) -> np.ndarray:
    """A pyarrow string column -> int64 raw IDs: the first 8 bytes of blake2b of the UTF-8
    text, as a non-negative int64, the same on every machine and run. Arrow's dictionary
    encoding finds the distinct values (in C++), so each is hashed once; nulls become
    MISSING_ID."""
    encoded = column.dictionary_encode()
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    hashed = np.array(
        [
            int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
            for text in encoded.dictionary.to_pylist()
        ],
        dtype=np.int64,
    )
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return np.where(indices >= 0, hashed[np.maximum(indices, 0)] if hashed.size else 0, MISSING_ID)


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_)


def _value_type(type_: pa.DataType) -> pa.DataType:
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _check_id_type(where: str, type_: pa.DataType) -> None:
    type_ = _value_type(type_)
    if pa.types.is_null(type_):  # every value missing (Arrow's type for an all-null column)
        return
    if pa.types.is_uint64(type_):
        raise ValueError(
            f"{where} is uint64: IDs of 2^63 and above do not fit int64 raw IDs; write it as "
            f"int64 (or as strings, which are hashed) and hashrec reads it"
        )
    if not (pa.types.is_integer(type_) or _is_string(type_)):
        raise ValueError(f"{where} is {type_}: categorical IDs must be integers or strings")


def check_schema(
    path: Path, schema: pa.Schema, label: str | None, dense: list[str], categorical: list[str]
) -> dict[str, bool]:
    """Check one file's schema against the declared columns; returns, per categorical column,
    whether it is a list column (several IDs per row). ValueError names file and column.
    ``label`` None: no label column is expected (scoring input)."""
    names = set(schema.names)
    labels = [] if label is None else [label]
    absent = [name for name in [*labels, *dense, *categorical] if name not in names]
    if absent:
        raise ValueError(f"{path}: columns {absent} are missing (has {sorted(names)})")
    for name, role in [*((name, "label") for name in labels), *((name, "dense") for name in dense)]:
        type_ = _value_type(schema.field(name).type)
        where = f"{path}: {role} column {name}"
        if _is_list(type_):
            raise ValueError(f"{where} is a list ({type_}) where one number per row is expected")
        if not (pa.types.is_integer(type_) or pa.types.is_floating(type_)
                or pa.types.is_boolean(type_) or pa.types.is_null(type_)):
            raise ValueError(
                f"{where} is {type_}: {role} values must be numbers"
                + (" (a categorical column? list it in data.categorical_columns)"
                   if role == "dense" else " (0/1)")
            )
    lists = {}
    for name in categorical:
        type_ = schema.field(name).type
        where = f"{path}: categorical column {name}"
        lists[name] = _is_list(type_)
        if lists[name]:
            if _is_list(type_.value_type):
                raise ValueError(f"{where} is {type_}: a list of lists (one list per row expected)")
            _check_id_type(f"{where} (list items)", type_.value_type)
        else:
            _check_id_type(where, type_)
    return lists


def label_values(column, where: str, name: str, row_offset: int = 0) -> np.ndarray:
    """A label column -> float32 [N] of 0/1, or BadRowError naming the first bad row."""
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise BadRowError(f"{where}, row {row + row_offset}: label {name} is null")
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = (values != 0) & (values != 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise BadRowError(
            f"{where}, row {row + row_offset}: label {name} is {values[row]:g}, not 0 or 1 "
            f"(a click label; turn a rating into one first, e.g. label = rating >= 4)"
        )
    return values.astype(np.float32)


def _ids(column, where: str, name: str, row_of) -> np.ndarray:
    """Flat IDs of a non-list column or of a list column's items -> int64, nulls MISSING_ID;
    a negative integer ID is a BadRowError (``row_of(i)``: the row of item i)."""
    if _is_string(_value_type(column.type)):
        return string_ids(column)
    if pa.types.is_null(column.type):
        return np.full(len(column), MISSING_ID, np.int64)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    ids = column.fill_null(MISSING_ID).to_numpy(zero_copy_only=False).astype(np.int64)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    negative = (ids < 0) & valid
    if negative.any():
        item = int(np.flatnonzero(negative)[0])
        raise BadRowError(
            f"{where}, row {row_of(item)}: categorical {name} has ID {ids[item]}: IDs must be "
            f">= 0 (a missing value is a null, not a negative ID)"
        )
    return ids


def id_bags(column, where: str, name: str, row_offset: int = 0) -> np.ndarray | Bags:
    """A categorical column -> int64 [N] raw IDs (MISSING_ID = empty bag) or, for a list
    column, Bags (null lists and null items dropped)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not _is_list(column.type):
        return _ids(column, where, name, lambda item: item + row_offset)
    offsets = column.offsets.to_numpy()
    # A null list's offsets span no items in Arrow's layout, but may in a sliced array.
    lengths = np.diff(offsets).astype(np.int32)
    lengths[column.is_null().to_numpy(zero_copy_only=False)] = 0
    items = column.flatten()  # the items of the non-null lists, in order

    def row_of(item: int) -> int:
        return int(np.searchsorted(np.cumsum(lengths), item, side="right")) + row_offset

    ids = _ids(items, where, name, row_of)
    keep = ids != MISSING_ID
    if not keep.all():  # null items inside a list: missing, like a null scalar
        rows = np.repeat(np.arange(len(lengths)), lengths)
        lengths = np.bincount(rows[keep], minlength=len(lengths)).astype(np.int32)
        ids = ids[keep]
    return Bags(ids, lengths)


def dense_values(
    column, where: str, name: str, null: str, mean: float | None, row_offset: int = 0
) -> np.ndarray:
    """A dense column -> float64 [N]; nulls fail (BadRowError), become 0 or the column's
    mean (``null``: fail | zero | mean)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        if null == "fail":
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise BadRowError(
                f"{where}, row {row + row_offset}: dense feature {name} is null "
                f"(data.dense_null=zero or mean fills nulls)"
            )
        fill = 0.0 if null == "zero" else mean
        if fill is None:
            raise ValueError(f"dense_null=mean needs the mean of {name}")
        column = pc.fill_null(column.cast(pa.float64()), fill)
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


def dense_column(
    column, where: str, name: str, null: str, mean: float | None, skip_bad_rows: bool,
    row_offset: int = 0,
) -> np.ndarray:
    """``dense_values`` as a reader applies data.dense_null: with skip_bad_rows a null under
    dense_null=fail becomes NaN, a bad row that ``finite_dense_rows`` drops (like a NaN)."""
    if skip_bad_rows and null == "fail":
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        values[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
        return values
    return dense_values(column, where, name, null, mean, row_offset)


def transform_dense(dense: np.ndarray, transform: str, statistics: list[dict]) -> np.ndarray:
    """Dense [N, D] float64 after data.dense_transform (none | log | standardize);
    ``statistics``: per column, {"mean", "std"} as measured once from the train data."""
    if transform == "log":
        return np.log1p(np.maximum(dense, 0.0))
    if transform == "standardize":
        mean = np.array([s["mean"] for s in statistics], dtype=np.float64)
        std = np.array([s["std"] if s["std"] > 0 else 1.0 for s in statistics], dtype=np.float64)
        return (dense - mean) / std
    if transform != "none":
        raise ValueError(f"dense_transform={transform!r} is not one of none, log, standardize")
    return dense
