"""Planted synthetic data as a data source."""

from __future__ import annotations

from modules.synthetic import PlantedClickData


class PlantedSource:
    """Synthetic planted-signal data (modules/synthetic.py): batch = f(seed, split, rank, step)."""

    skipped_rows = 0
    skipped_rows_are_global = True

    def __init__(self, data: PlantedClickData, num_eval_batches: int) -> None:
        self.data = data
        self.num_eval_batches = num_eval_batches

    def train_batches(self, rank, world_size, start_step, stop_step):
        for step in range(start_step, stop_step):
            yield self.data.batch("train", rank, step)[0]

    def eval_batches(self, rank, world_size):
        for step in range(self.num_eval_batches):
            yield self.data.batch("eval", rank, step)[0]
