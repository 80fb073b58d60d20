"""Per-rank throughput, step-time split and memory, gathered to every rank every N steps.

The loop measures a *window* of steps (the steps since the last report) on every rank: wall
time, the part of it spent waiting for the next batch (``TimedIterator`` times the ``next()``
calls the train pipeline makes; batches are made inside those calls), and the rest, which is
forward + backward + optimizer + the pipeline's input all-to-all. At the window's end each rank
packs its figures into one float64 vector and one ``all_gather`` (``gather_stack`` in
``train/collectives.py``) brings all ranks' vectors to every rank: one collective per window, none per step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Iterator, TypeVar

import torch

from train.system_info import cuda_memory_bytes, peak_rss_bytes, rss_bytes

T = TypeVar("T")

# Order of the per-rank vector; the loss is put in by the caller as a device tensor.
RANK_FIGURES = (
    "loss",
    "samples_per_sec",
    "step_seconds",
    "data_wait_seconds",
    "compute_seconds",
    "rss_bytes",
    "peak_rss_bytes",
    "cuda_allocated_bytes",
    "cuda_reserved_bytes",
    "cuda_peak_allocated_bytes",
)


class TimedIterator(Iterator[T]):
    """Wraps an iterator and adds up the seconds spent inside ``next()``."""

    def __init__(self, iterator: Iterator[T]) -> None:
        self.iterator = iterator
        self.seconds = 0.0

    def __iter__(self) -> "TimedIterator[T]":
        return self

    def __next__(self) -> T:
        started = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - started

    def close(self) -> None:
        """Close the wrapped iterator if it can be (a generator: its ``finally`` runs now)."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


@dataclass
class Window:
    """The steps since the last report, as one rank sees them."""

    start_step: int
    started: float
    data_seconds_at_start: float

    @classmethod
    def open(cls, step: int, batches: TimedIterator) -> "Window":
        return cls(step, time.perf_counter(), batches.seconds)


def rank_figures(
    window: Window,
    end_step: int,
    batches: TimedIterator,
    window_loss: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """This rank's [len(RANK_FIGURES)] float64 vector for the window ending at ``end_step``.

    ``window_loss`` is the mean loss of the window as a 0-dim device tensor: it is not read
    on the host here, so building the vector costs no host-device sync beyond the one below.
    """
    if device.type == "cuda":
        # Kernels run asynchronously: wait for the window's GPU work so its wall time is real.
        # Once per window, not per step.
        torch.cuda.synchronize(device)
    seconds = max(time.perf_counter() - window.started, 1e-9)
    num_steps = max(end_step - window.start_step, 1)
    data_seconds = batches.seconds - window.data_seconds_at_start
    cuda = cuda_memory_bytes(device)
    host = torch.tensor(
        [
            num_steps * batch_size / seconds,
            seconds / num_steps,
            data_seconds / num_steps,
            (seconds - data_seconds) / num_steps,
            rss_bytes(),
            peak_rss_bytes(),
            cuda.get("cuda_allocated_bytes", 0),
            cuda.get("cuda_reserved_bytes", 0),
            cuda.get("cuda_peak_allocated_bytes", 0),
        ],
        dtype=torch.float64,
    )
    return torch.cat([window_loss.detach().to(torch.float64).reshape(1), host.to(device)])


def rank_series(
    per_rank: torch.Tensor,
    on_cuda: bool,
    planned_embedding_bytes: list[int],
    measured_embedding_bytes: list[int] | None,
) -> dict[str, list[float]]:
    """Each per-rank figure of a window as ``{"perf/step_seconds": [rank 0, rank 1, ...]}``,
    from the gathered [world_size, K] figures; CUDA memory only on CUDA, the measured
    embedding bytes only once measured."""
    column = {name: per_rank[:, index].tolist() for index, name in enumerate(RANK_FIGURES)}
    series = {
        f"perf/{name}": column[name]
        for name in ("samples_per_sec", "step_seconds", "data_wait_seconds", "compute_seconds")
    }
    memory = ["rss_bytes", "peak_rss_bytes"]
    if on_cuda:
        memory += ["cuda_allocated_bytes", "cuda_reserved_bytes", "cuda_peak_allocated_bytes"]
    series.update({f"mem/{name}": column[name] for name in memory})
    series["mem/embedding_planned_bytes"] = list(planned_embedding_bytes)
    if measured_embedding_bytes is not None:
        series["mem/embedding_measured_bytes"] = list(measured_embedding_bytes)
    return series


def window_metrics(
    per_rank: torch.Tensor,
    batch_size: int,
    num_steps: int,
    on_cuda: bool,
    planned_embedding_bytes: list[int],
    measured_embedding_bytes: list[int] | None,
    per_rank_keys: bool = True,
) -> dict[str, float]:
    """W&B keys for one window from the gathered [world_size, K] figures.

    ``per_rank_keys``: one key per rank and figure (``perf/step_seconds/rank3``); else, for
    large jobs whose key count would grow with the world size, ``/min``, ``/median`` and
    ``/max`` over ranks (``rank_table`` then holds the per-rank figures).
    """
    world_size = per_rank.shape[0]
    column = {name: per_rank[:, index].tolist() for index, name in enumerate(RANK_FIGURES)}
    slowest_step = max(column["step_seconds"])
    metrics: dict[str, float] = {
        # The global loss is the mean of the ranks' local means (equal batch sizes).
        "train/loss": sum(column["loss"]) / world_size,
        # Ranks step in lock-step, so the slowest rank sets the global rate.
        "perf/samples_per_sec": world_size * batch_size / slowest_step,
        "perf/step_seconds": slowest_step,
        "perf/data_wait_seconds": max(column["data_wait_seconds"]),
        "perf/compute_seconds": max(column["compute_seconds"]),
        "perf/window_steps": num_steps,
        "mem/rss_bytes_max": max(column["rss_bytes"]),
        "mem/peak_rss_bytes_max": max(column["peak_rss_bytes"]),
    }
    series = rank_series(per_rank, on_cuda, planned_embedding_bytes, measured_embedding_bytes)
    for key, values in series.items():
        if per_rank_keys:
            metrics.update({f"{key}/rank{rank}": value for rank, value in enumerate(values)})
        else:
            metrics[f"{key}/min"] = min(values)
            metrics[f"{key}/median"] = statistics.median(values)
            metrics[f"{key}/max"] = max(values)
    return metrics


def rank_table(
    per_rank: torch.Tensor,
    on_cuda: bool,
    planned_embedding_bytes: list[int],
    measured_embedding_bytes: list[int] | None,
) -> tuple[list[str], list[list[float]]]:
    """The window's per-rank figures as a table: a ``rank`` column, then one column per
    figure (``perf/step_seconds``, ``mem/rss_bytes``, ...), one row per rank."""
    series = rank_series(per_rank, on_cuda, planned_embedding_bytes, measured_embedding_bytes)
    columns = ["rank", *series]
    rows = [[rank, *(values[rank] for values in series.values())]
            for rank in range(per_rank.shape[0])]
    return columns, rows
