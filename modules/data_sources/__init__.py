"""Where batches come from: planted synthetic data, preprocessed Criteo shards, Parquet.

One source per module (``planted``, ``criteo``, ``parquet``); ``source`` holds what they share.
Every source gives each rank its own stream and the same number of batches per step on every
rank (sharded lookups are collectives: all ranks must run the same batches count).

    source.train_batches(rank, world_size, start_step, stop_step) -> Iterator[Batch]
    source.eval_batches(rank, world_size) -> Iterator[Batch]
"""

from modules.data_sources.criteo import CriteoSource
from modules.data_sources.parquet import ParquetSource, string_ids
from modules.data_sources.planted import PlantedSource
from modules.data_sources.source import DataSource, check_feature_columns

__all__ = [
    "CriteoSource",
    "DataSource",
    "ParquetSource",
    "PlantedSource",
    "check_feature_columns",
    "string_ids",
]
