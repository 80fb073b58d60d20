"""Make batches ahead of time on a background thread, so the training loop does not wait.

Batch making is mostly torch ops (which release the GIL) or memory-mapped reads, so a
thread overlaps it with the step that is running. Order is kept: the batches come out exactly
as the wrapped iterator yields them, so data stays a pure function of (seed, rank, step).
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

import torch

T = TypeVar("T")
_END = object()


def prefetched(source: Iterator[T], depth: int) -> Iterator[T]:
    """Yield ``source``'s items, computed up to ``depth`` ahead on a daemon thread.

    An exception in the thread is raised in the consumer at the item where it happened.
    Closing the returned generator (or dropping it) stops the thread after its current item.
    """
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
