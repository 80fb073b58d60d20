"""When one rank fails, every rank stops within seconds, naming that rank's error.

A rank that meets bad input mid-step (a malformed Parquet row on its row group, say) raises
on that rank alone. The others are already waiting in the step's collectives for it. With
gloo they see "Connection closed by peer" once it exits, and with nccl they wait until the
process-group timeout. Either way their own output says nothing about the real cause.

So every rank of a multi-rank job keeps a small channel open on the job's rendezvous store
(the TCPStore every launcher already starts: torchrun's agent, or rank 0 under srun):

- a rank that fails ``publish``-es its one-line error under one key (the first failure
  wins);
- each rank has a daemon thread that checks that key every ``poll_s`` seconds. When another
  rank's error appears, the main thread gets ``grace_s`` seconds to fail on its own, through
  the normal error path: the collective it waits in errors out, and ``explain`` turns that
  error into a ``RankFailed`` carrying the line. If the main thread is still stuck after that
  (an nccl collective that never returns), the thread prints the line on rank 0 and ends the
  process.

A store check is one small request per rank per ``poll_s``; nothing touches the training
step or the device.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

RANK_FAILED_EXIT_CODE = 1


class RankFailed(Exception):
    """Another rank failed first; the message names it and its one line. ``announce``: this
    rank prints it (rank 0 only: one line for the job, not one per rank)."""

    def __init__(self, message: str, announce: bool) -> None:
        super().__init__(message)
        self.announce = announce

    @classmethod
    def of(cls, failed_rank: int, line: str, announce: bool) -> RankFailed:
        return cls(f"rank {failed_rank} failed: {line}", announce)


def _failure_key() -> str:
    # torchrun's agent keeps its store over restarts (--max-restarts): a key per attempt, so
    # a restart does not read the previous attempt's failure.
    return f"hashrec/rank_failure/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


class RankFailureChannel:
    """This rank's end of the channel; ``start`` once the process group is up."""

    def __init__(self, rank: int, poll_s: float = 1.0, grace_s: float = 3.0) -> None:
        self.rank = rank
        self.poll_s = poll_s
        self.grace_s = grace_s
        self._key = _failure_key()
        # A client connection of its own: a check from the watching thread never waits
        # behind the process group's own use of the store.
        self._store = dist.TCPStore(
            host_name=os.environ["MASTER_ADDR"],
            port=int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=30),
        )
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rank-failure-watch", daemon=True)

    def start(self) -> RankFailureChannel:
        self._thread.start()
        return self

    def publish(self, line: str) -> None:
        """Tell every rank this rank failed with ``line`` (kept only if no rank was first)."""
        try:
            self._store.compare_set(self._key, "", f"{self.rank}\t{line}")
        except Exception:  # the store's host is gone: its launcher is ending the job anyway
            pass

    def other_rank_failure(self) -> tuple[int, str] | None:
        """(rank, line) of the first published failure if another rank's, else None."""
        try:
            if not self._store.check([self._key]):
                return None
            rank, line = self._store.get(self._key).decode().split("\t", 1)
        except Exception:
            return None
        return None if int(rank) == self.rank else (int(rank), line)

    def explain(self, error: BaseException) -> BaseException:
        """What this rank should raise for ``error``, which ends its job.

        An error a collective can raise when its peer is gone (RuntimeError, DistError,
        a timeout) may be another rank's failure seen from here: if another rank publishes
        its failure within ``grace_s``, this is a RankFailed naming it. Anything else (and
        such an error with no published failure) is this rank's own: it is published for
        the others and returned unchanged. Errors every rank raises together (a bad config,
        IDs out of range) stay each rank's own.
        """
        if _may_be_a_lost_peer(error):
            for _ in range(max(1, int(self.grace_s / 0.1))):
                failure = self.other_rank_failure()
                if failure is not None:
                    return RankFailed.of(*failure, announce=self.rank == 0)
                time.sleep(0.1)
            lost = _LOST_PEER.search(str(error))
            if lost:
                # A rank that died without a word (killed, out of memory, a crash in C++).
                # Every rank says so: the one that would print alone may be the dead one.
                return RankFailed(
                    "another rank ended without a message (killed, out of memory or crashed: "
                    f"see its log); rank {self.rank} lost it in a collective "
                    f"({type(error).__name__}: {lost.group(0)})",
                    announce=True,
                )
        self.publish(_one_line(error))
        return error

    def close(self) -> None:
        """Stop watching (before the process group goes: the store may go with it)."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s + 1)

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            failure = self.other_rank_failure()
            if failure is None:
                continue
            # The main thread usually fails on its own now (its collective lost the peer) and
            # leaves through the normal error path; give it that chance.
            if self._closed.wait(self.grace_s):
                return
            # Still stuck (an nccl collective that never returns): end the process.
            if self.rank == 0:
                sys.stderr.write(f"hashrec: error: {RankFailed.of(*failure, announce=True)}\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(RANK_FAILED_EXIT_CODE)


# What gloo and nccl say when the other end of a collective has gone away.
_LOST_PEER = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|remote process exited"
    r"|communicator was aborted",
    re.IGNORECASE,
)


def _may_be_a_lost_peer(error: BaseException) -> bool:
    return isinstance(error, (RuntimeError, dist.DistError, TimeoutError, ConnectionError))


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    # hashrec's own errors are one line written for the user; others get their type name.
    if type(error).__module__.split(".")[0] in ("train", "modules"):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def watch_rank_failures(rank: int, world_size: int) -> RankFailureChannel | None:
    """The started channel of a multi-rank job (None for one rank: nothing to tell)."""
    if world_size <= 1 or not dist.is_initialized():
        return None
    return RankFailureChannel(rank).start()
