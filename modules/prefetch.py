"""Make batches ahead of time on a background thread, so the training loop does not wait.

Batch making is mostly torch ops (which release the GIL) or memory-mapped reads, so a
thread overlaps it with the step that is running. Order is kept: the batches come out exactly
as the wrapped iterator yields them, so data stays a pure function of (seed, rank, step).

Where the job trains on CUDA the thread also pins each batch (page-locked host memory): the
train pipeline copies batches to the device with ``non_blocking=True``, and a copy from
pageable memory is synchronous, so an unpinned batch stalls the host at every step.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

import torch

T = TypeVar("T")
_END = object()


def pin_batches_for(device: torch.device) -> bool:
    """Whether batches bound for ``device`` should be pinned: only for CUDA, where pinned
    memory makes the pipeline's non-blocking copies asynchronous. On CPU there is no copy
    (and pinning needs an accelerator)."""
    return device.type == "cuda"


def _pinned(items: Iterator[T]) -> Iterator[T]:
    for item in items:
        yield item.pin_memory()  # type: ignore[attr-defined]


def prefetched(source: Iterator[T], depth: int, pin_memory: bool = False) -> Iterator[T]:
    """Yield ``source``'s items, computed up to ``depth`` ahead on a daemon thread.

    ``pin_memory``: pin each item (``item.pin_memory()``) on that thread, off the training
    step's path (see ``pin_batches_for``); with ``depth`` 0 the consumer pins.
    An exception in the thread is raised in the consumer at the item where it happened.
    Closing the returned generator (or dropping it) stops the thread after its current item.
    """
    if pin_memory:
        source = _pinned(source)
    if depth <= 0:
        yield from source
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        # One intra-op thread here (an OpenMP setting of this thread only): the training
        # step keeps the cores; batch making fills the gaps between its parallel regions.
        torch.set_num_threads(1)
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_END)
        except BaseException as error:  # handed to the consumer
            items.put(error)

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
