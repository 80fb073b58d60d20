"""Collectives hashrec's job uses outside the model. Every rank must call each of them, in the
same order: a collective that one rank skips leaves the others waiting in it for ever.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")

# Work that rank 0 does alone (preprocessing a raw Criteo day, planning thousands of tables)
# can outlast the process group's timeout, and under nccl a rank that waits in a collective is
# killed by NCCL's watchdog when that timeout passes. The other ranks therefore wait for rank
# 0's result on a CPU (gloo) group of their own, whose timeout is long.
RANK_ZERO_WORK_TIMEOUT = timedelta(hours=12)

# (the default group it was made under, the group): made again under a new default group.
_waiting_group: tuple[Any, dist.ProcessGroup] | None = None


def _group_for_waiting() -> dist.ProcessGroup:
    """A gloo group over all ranks with a long timeout (made on first use: a collective)."""
    global _waiting_group
    world = dist.group.WORLD
    if _waiting_group is None or _waiting_group[0] is not world:
        _waiting_group = (world, dist.new_group(backend="gloo", timeout=RANK_ZERO_WORK_TIMEOUT))
    return _waiting_group[1]


class RankZeroError(Exception):
    """Rank 0's exception, raised on every other rank: same type name and one-line message."""


def on_rank_zero(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception.

    Rank 0 re-raises the original exception; the other ranks raise one of the same class when
    it can be built from a message (ValueError, OSError, hashrec's own one-line errors), else
    ``RankZeroError``, with the same message. The result must pickle. A collective: every rank
    must call it, whatever rank 0 does.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", fn(*args, **kwargs))]
        except Exception as caught:  # handed to every rank below
            error = caught
            outcome = [("error", (type(caught), str(caught)))]
    dist.broadcast_object_list(outcome, src=0, group=_group_for_waiting())
    status, value = outcome[0]
    if status == "ok":
        return value
    if error is not None:
        raise error
    error_type, message = value
    try:
        rebuilt = error_type(message)
    except Exception:  # a class that does not take one message
        rebuilt = RankZeroError(f"{error_type.__name__} on rank 0: {message}")
    raise rebuilt
