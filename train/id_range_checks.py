"""Raw IDs outside a ``none`` table stop every rank, without a host sync in every step.

In training the ID mappers run in deferred mode (``modules/id_mapping.py``): a mapper records
the first out-of-range ID it meets on the device, with device ops only, and training goes on
(the ID is wrapped onto a real row, so nothing reads out of bounds). The loop reads the records
at steps that synchronise anyway (logging steps, segment ends, before a checkpoint is saved):
one small all_gather, so a bad ID met by one rank stops all of them at the same step with the
same one-line IdOutOfRangeError, instead of one rank failing inside the pipeline while the
others wait in its next collective.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from modules.id_mapping import HashingIdMapper
from train.collectives import gather_concat


def range_checked_mappers(model: nn.Module) -> list[HashingIdMapper]:
    """The model's mappers with a ``none`` feature, in module order (the same on every rank:
    every rank builds the same model)."""
    return [m for m in model.modules() if isinstance(m, HashingIdMapper) and m.has_range_check]


@contextmanager
def deferred_id_range_errors(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's mappers record bad IDs instead of raising."""
    mappers = range_checked_mappers(model)
    previous = [m.defer_range_errors for m in mappers]
    for mapper in mappers:
        mapper.defer_range_errors = True
    try:
        yield
    finally:
        for mapper, before in zip(mappers, previous):
            mapper.defer_range_errors = before


def _all_records(mappers: list[HashingIdMapper]) -> list[list[int]]:
    """Every rank's records, rank after rank: [world_size * len(mappers)] x 3. A collective;
    reading them on the host is a sync, which is why this runs only at logging steps."""
    return gather_concat(torch.stack([m.out_of_range for m in mappers])).tolist()


def raise_if_ids_out_of_range(model: nn.Module) -> None:
    """Raise the first recorded IdOutOfRangeError (lowest rank, then module order) on every
    rank, or return. A collective: every rank calls it at the same step."""
    mappers = range_checked_mappers(model)
    if not mappers:
        return
    records = _all_records(mappers)
    if not any(record[0] for record in records):
        return
    # On CUDA a mapper writes its record on the pipeline's data-dist stream, which may have
    # been writing it while the gather read it. Errors are rare: wait for every stream, read
    # again (every rank takes this branch, as every rank saw the same gathered records).
    if any(m.out_of_range.is_cuda for m in mappers):
        torch.cuda.synchronize()
        records = _all_records(mappers)
    for index, record in enumerate(records):
        error = mappers[index % len(mappers)].out_of_range_error(record)
        if error is not None:
            raise error
