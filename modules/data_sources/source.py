"""What every data source gives: per-rank batch streams, the same count on every rank."""

from __future__ import annotations

from typing import Iterator, Protocol

from modules.batch import Batch
from modules.features import FeatureGroupSpec, all_features


class DataSource(Protocol):
    # Malformed rows skipped (data.on_bad_row=skip). Counted per rank unless
    # skipped_rows_are_global (then every rank reports the same, job-wide number).
    skipped_rows: int
    skipped_rows_are_global: bool

    def train_batches(
        self, rank: int, world_size: int, start_step: int, stop_step: int
    ) -> Iterator[Batch]: ...

    def eval_batches(self, rank: int, world_size: int) -> Iterator[Batch]: ...


def check_feature_columns(groups: list[FeatureGroupSpec], columns: list[str], source: str) -> None:
    """Every configured feature must name a categorical column of the data."""
    missing = [f.name for f in all_features(groups) if f.name not in columns]
    if missing:
        raise ValueError(
            f"{source}: features {missing} have no categorical column (columns: {columns})"
        )
