"""Statistics of Parquet training data, measured once: what a feature set derived from the
columns needs (distinct IDs per categorical column, IDs per row) and what dense
normalisation and null filling need (each dense column's mean and standard deviation).

The measure reads the first ``max_rows`` rows in file order (all rows when the data is
smaller); ``rows_measured`` against ``rows_total`` says whether the counts are exact or a
sample's (distinct counts from a sample are lower bounds of the ID space).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modules.data_sources.parquet_columns import id_bags
from modules.tabular import MISSING_ID, Bags


def measure_statistics(
    row_groups: list[tuple[Path, int, int]],
    dense: list[str],
    categorical: list[str],
    max_rows: int,
) -> dict:
    """{"rows_measured", "rows_total", "dense": {name: {"mean", "std", "count"}},
    "categorical": {name: {"distinct", "ids_per_row", "list"}}} over the first ``max_rows``
    rows of ``row_groups`` ((file, row group, rows), in reading order)."""
    import pyarrow.parquet as pq

    sums = {name: [0.0, 0.0, 0] for name in dense}  # sum, sum of squares, count
    uniques: dict[str, list[np.ndarray]] = {name: [] for name in categorical}
    ids = {name: 0 for name in categorical}
    lists = {name: False for name in categorical}
    measured = 0
    for path, index, num_rows in row_groups:
        if measured >= max_rows:
            break
        take = min(num_rows, max_rows - measured)
        table = pq.ParquetFile(path).read_row_group(index, columns=[*dense, *categorical])
        table = table.slice(0, take)
        where = f"{path.name} row group {index}"
        for name in dense:
            values = table.column(name).drop_null().to_numpy().astype(np.float64)
            values = values[np.isfinite(values)]
            sums[name][0] += float(values.sum())
            sums[name][1] += float((values * values).sum())
            sums[name][2] += values.size
        for name in categorical:
            column = id_bags(table.column(name), where, name)
            if isinstance(column, Bags):
                lists[name] = True
                values = column.values
            else:
                values = column[column != MISSING_ID]
            ids[name] += values.size
            uniques[name].append(np.unique(values))
        measured += take
    statistics: dict = {"rows_measured": measured,
                        "rows_total": sum(rows for _, _, rows in row_groups),
                        "dense": {}, "categorical": {}}
    for name, (total, squares, count) in sums.items():
        mean = total / count if count else 0.0
        variance = max(squares / count - mean * mean, 0.0) if count else 0.0
        statistics["dense"][name] = {"mean": mean, "std": variance**0.5, "count": count}
    for name in categorical:
        distinct = np.unique(np.concatenate(uniques[name])).size if uniques[name] else 0
        statistics["categorical"][name] = {
            "distinct": int(distinct),
            "ids_per_row": ids[name] / measured if measured else 0.0,
            "list": lists[name],
        }
    return statistics
