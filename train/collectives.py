"""Every collective hashrec's job uses outside the model, in one place.

Every rank must call each of them, in the same order: a collective that one rank skips leaves
the others waiting in it for ever. Each works without a process group (or with one rank) too,
returning what one rank alone would.

- ``on_rank_zero``: rank 0 runs it, every rank gets the result or the exception.
- ``first_error``: any rank's error message, on every rank.
- ``barrier``: every rank waits for all.
- ``gather_concat`` / ``gather_stack``: every rank's tensor, on every rank.
- ``gather_concat_on_rank_zero``: every rank's tensor, on rank 0 only.
- ``reduce_over_ranks`` / ``global_mean``: a number summed, maximised, minimised or averaged
  over ranks.
- ``AnyRankVote``: "did any rank raise its flag?", asynchronously, on a host-side group.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
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


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: the current GPU under nccl (which
    rejects CPU tensors), the CPU under gloo or without a process group."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank has reached this call. A collective: every rank must call it."""
    if _distributed():
        dist.barrier()


def first_error(error: str | None) -> str | None:
    """Any rank's error message (the lowest rank's), on every rank; None when no rank has one.
    A collective: every rank must call it, with or without an error."""
    if not _distributed():
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((message for message in errors if message), None)


def gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' [N, ...] tensors concatenated in rank order ([world_size * N, ...]; equal
    shapes on every rank), on the input's device; the gather itself runs where the backend
    needs it. A collective: every rank must call it."""
    if not _distributed():
        return tensor
    local = tensor.to(collective_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.cat(gathered).to(tensor.device)


def gather_concat_on_rank_zero(tensor: torch.Tensor) -> torch.Tensor | None:
    """All ranks' [N, ...] tensors concatenated in rank order on rank 0, as gather_concat
    would (equal shapes on every rank, the input's device); None on the other ranks, which
    then hold no copy of anyone's data. A collective: every rank must call it."""
    if not _distributed():
        return tensor
    local = tensor.to(collective_device())
    is_main = dist.get_rank() == 0
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())] if is_main else None
    dist.gather(local, gathered, dst=0)
    return torch.cat(gathered).to(tensor.device) if gathered is not None else None


def gather_stack(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' equal-shape tensors stacked in rank order: [world_size, ...] on the input's
    device. A collective: every rank must call it."""
    return gather_concat(tensor.unsqueeze(0))


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def reduce_over_ranks(value: int, device: torch.device, op: str = "sum") -> int:
    """An integer summed (``sum``), maximised (``max``) or minimised (``min``) over ranks. A
    collective: every rank must call it."""
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=REDUCE_OPS[op])
    return int(tensor)


def global_mean(value: float, device: torch.device) -> float:
    """Mean of a float over ranks. A collective: every rank must call it."""
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


class AnyRankVote:
    """"Did any rank raise its flag?", agreed on by all ranks off the step's critical path.

    A vote reduces the ranks' flags on a gloo group of its own, with host tensors, and
    asynchronously: each call starts this vote's all-reduce and returns the *previous* vote's
    outcome, which finished long ago (the caller votes every few steps), so waiting for it
    costs nothing. No device is involved (on GPU a vote on the nccl group would need a CUDA
    tensor and a device-to-host read, a sync at every vote), and the vote never queues between
    the training's own collectives. Every rank sees the same outcome at the same call; the
    price is one vote of delay between a flag and its outcome.

    Creating one is a collective (it makes the group), and so is every ``vote``: every rank
    must create it at the same point and vote at the same steps.
    """

    def __init__(self) -> None:
        # A collective: every rank creates the group at the same call.
        self.group = dist.new_group(backend="gloo") if _distributed() else None
        self.pending: tuple[dist.Work, torch.Tensor] | None = None

    def vote(self, flag: bool) -> bool:
        """Cast this rank's flag; True if any rank's flag was set at the previous vote (one
        rank alone: its flag now). A collective: every rank must call it at the same steps."""
        if self.group is None:
            return flag
        if self.pending is not None:
            work, outcome = self.pending
            work.wait()
            if outcome.item():  # a host tensor: no device sync
                return True  # every rank returns here, so no rank starts another vote
        ballot = torch.tensor([int(flag)], dtype=torch.int32)  # on the host, for gloo
        work = dist.all_reduce(ballot, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, ballot)
        return False
