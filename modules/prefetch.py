"""Make batches ahead of time on a background thread, so the training loop does not wait.

Batch making is mostly torch ops (which release the GIL) or memory-mapped reads, so a
thread overlaps it with the step that is running. Order is kept: the batches come out exactly
as the wrapped iterator yields them, so data stays a pure function of (seed, rank, step).

Where the job trains on CUDA the thread also pins each batch (page-locked host memory): the
train pipeline copies batches to the device with ``non_blocking=True``, and a copy from
pageable memory is synchronous, so an unpinned batch stalls the host at every step.

Closing the stream joins the thread, and the consumer must close it (the training loop does,
when a segment ends for any reason). A thread still running when the interpreter exits is
ended by CPython (Python < 3.14) with ``pthread_exit`` as soon as it wants the GIL back; inside
torch's C++ (freeing a tensor releases the GIL) that forced unwind meets a ``noexcept`` frame
and libstdc++ aborts the process: "terminate called without an active exception", status -6,
after the job had finished.
"""

from __future__ import annotations

import queue
import sys
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
    Closing the returned generator stops the thread after its current item and waits for it
    to end, so no thread of this stream outlives ``close()``.
    """
    if pin_memory:
        source = _pinned(source)
    if depth <= 0:
        yield from source
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Queue ``item`` once there is room; False if the consumer stopped first (it no
        longer takes items, so a plain put on a full queue would wait for ever)."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        # One intra-op thread here (an OpenMP setting of this thread only): the training
        # step keeps the cores; batch making fills the gaps between its parallel regions.
        torch.set_num_threads(1)
        try:
            for item in source:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as error:  # handed to the consumer
            offer(error)

    # A daemon, so that a stream nobody closes cannot keep the process alive; close() joins it.
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
        # At most one item's making: the thread checks ``stop`` between items. It ends here,
        # while the interpreter is whole, and drops what it held (the source, its last item).
        # Not when a stream nobody closed is collected at exit: the thread cannot end then.
        if not sys.is_finalizing():
            worker.join()
