"""Parquet reading (modules/data_sources/parquet.py): a training stream that starts at step s
is the tail of one that starts at 0 and reads only the row groups it needs; with bad rows
skipped, every rank runs the same number of eval batches and every surviving row is scored
once."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.batch import Batch
from modules.data_sources import ParquetSource
from tests.helpers import run_ranks, run_train
from tests.test_criteo import summary_of, write_parquet
from train.build import feature_groups
from train.collectives import gather_stack
from train.compose import compose_config
from train.config import Config
from train.data import build_data_source
from train.distributed import DistributedContext

BATCH = 64
# Criteo sample as Parquet: train 7,200 rows in row groups of 250 (29 groups; rows split over
# ranks: rank 0 of 2 has rows 0-3599 in 15 pieces, so 70 steps of 64 go round them more than
# once); eval 409 rows in groups of 100 (rank 0: rows 0-203, rank 1: rows 204-408).
ROW_GROUPS = (250, 100)
STEPS = 70
# Bad train rows on both ranks' groups, scattered, plus the whole of row group 2 (rank 0's
# second group: a group with no surviving row). Bad eval rows all in rank 0's group 0: it
# keeps 174 rows (3 batches of 64, the last partial), rank 1 205 (4): both run 4.
BAD_ROWS = {
    "train": sorted({*range(3, 7200, 37), *range(500, 750)}),
    "eval": list(range(30)),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, list[str]]:
    """Overrides for the clean data and for the data with bad rows (skipped)."""
    clean = tmp_path_factory.mktemp("clean")
    bad = tmp_path_factory.mktemp("bad")
    size = f"trainer.batch_size={BATCH}"
    return {
        "clean": [*write_parquet(clean, row_groups=ROW_GROUPS), size],
        "bad": [*write_parquet(bad, row_groups=ROW_GROUPS, nan_rows=BAD_ROWS), size,
                "data.on_bad_row=skip"],
    }


@functools.cache
def composed(overrides: tuple[str, ...]) -> Config:
    return compose_config(list(overrides))


class RecordedReads(ParquetSource):
    """A ParquetSource that records every read of the data: (row group, full or dense)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, str]] = []

    def _read_columns(self, path: Path, index: int, columns: list[str]):
        self.reads.append((index, "full" if self.label_column in columns else "dense"))
        return super()._read_columns(path, index, columns)


def source_for(overrides: list[str], kind: type[ParquetSource] = ParquetSource) -> ParquetSource:
    config = composed(tuple(overrides))
    data = config.data
    return kind(
        Path(data.train_path), Path(data.eval_path),
        feature_groups(config.features, config.hashing), config.trainer.batch_size,
        data.label_column, list(data.dense_columns), list(data.categorical_columns),
        skip_bad_rows=data.on_bad_row == "skip", dense_null=data.dense_null,
    )


def assert_same_batches(got: list[Batch], expected: list[Batch]) -> None:
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a.labels, b.labels), step
        assert torch.equal(a.dense_features, b.dense_features), step
        assert a.sparse_features.keys() == b.sparse_features.keys()
        for group in a.sparse_features:
            x, y = a.sparse_features[group], b.sparse_features[group]
            assert x.keys() == y.keys(), step
            assert torch.equal(x.values(), y.values()), (step, group)
            assert torch.equal(x.lengths(), y.lengths()), (step, group)


@pytest.mark.parametrize("kind", ["clean", "bad"])
def test_a_stream_started_at_step_s_is_the_tail_of_one_started_at_zero(data, kind):
    # Starts within the first pass over a rank's groups, at and past its end (the seek goes
    # round the cycle), each on a fresh source (a resumed job) and on the same one (the next
    # segment after an eval).
    starts = [1, 56, 57, 58, 69]
    for rank in (0, 1):
        source = source_for(data[kind])
        whole = list(source.train_batches(rank, 2, 0, STEPS))
        assert all(len(batch.labels) == BATCH for batch in whole)
        assert not any(batch.dense_features.isnan().any() for batch in whole)
        for start in starts:
            assert_same_batches(list(source_for(data[kind]).train_batches(rank, 2, start, STEPS)),
                                whole[start:])
            assert_same_batches(list(source.train_batches(rank, 2, start, STEPS)), whole[start:])
        if kind == "bad":  # bad rows were met and dropped on both ranks
            assert source.skipped_rows > 0


def groups_holding(surviving: list[int], first_row: int, end_row: int) -> set[int]:
    """Positions of the row groups (surviving rows per group, cycling) that hold rows
    [first_row, end_row) of the stream, and of the empty ones between them."""
    held, start, cycle = set(), 0, sum(surviving)
    for lap in range(end_row // cycle + 1):
        for position, rows in enumerate(surviving):
            begin, end = lap * cycle + start, lap * cycle + start + rows
            if begin < end_row and end > first_row:
                held.add(position)
            start += rows
        start = 0
    return held


@pytest.mark.parametrize("kind", ["clean", "bad"])
@pytest.mark.parametrize("start", [30, 1000])  # within the first pass over the groups; the 18th
def test_a_late_start_reads_only_the_row_groups_it_needs(data, kind, start):
    rank, stop = 0, start + 2
    # What the two batches must hold, from a plain read of every one of this rank's groups:
    # rows [start * B, stop * B) of its surviving rows, going round them.
    plain = source_for(data[kind])
    mine = plain.rank_pieces("train", rank, 2)
    parts = [plain._read(*piece) for piece in mine]
    surviving = [len(part["label"]) for part in parts]
    stream = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    rows = np.arange(start * BATCH, stop * BATCH) % sum(surviving)
    expected = [plain._to_batch({name: values[rows[i : i + BATCH]] for name, values in
                                 stream.items()}) for i in (0, BATCH)]
    needed = {mine[p][1] for p in groups_holding(surviving, start * BATCH, stop * BATCH)}
    first = min(groups_holding(surviving, start * BATCH, start * BATCH + 1))

    source = source_for(data[kind], RecordedReads)
    assert_same_batches(list(source.train_batches(rank, 2, start, stop)), expected)
    full = [index for index, how in source.reads if how == "full"]
    dense = [index for index, how in source.reads if how == "dense"]
    assert sorted(full) == sorted(needed) and len(needed) <= 3, (full, needed)
    if kind == "clean":
        assert dense == []  # the metadata's row counts are exact: no data read to seek
    else:
        # Surviving rows counted from the dense columns of the groups passed over, once each:
        # those before the start in the first pass, or one whole pass.
        passed = mine if start * BATCH >= sum(surviving) else mine[: first + 1]
        assert sorted(dense) == sorted(index for _, index, _, _ in passed), dense
    # The same skipped rows as a run from step 0 (past one pass, every group's are counted).
    reference = source_for(data[kind])
    list(reference.train_batches(rank, 2, 0, min(stop, STEPS)))
    assert source.skipped_rows == reference.skipped_rows

    # The next segment (after an eval) seeks again without reading anything to count.
    source.reads.clear()
    list(source.train_batches(rank, 2, stop, stop + 1))
    assert [how for _, how in source.reads] == ["full"] * len(source.reads) and source.reads


def test_train_data_with_no_surviving_row_fails_instead_of_looping(tmp_path):
    overrides = [*write_parquet(tmp_path, row_groups=ROW_GROUPS,
                                nan_rows={"train": list(range(7200))}), "data.on_bad_row=skip"]
    for start in (0, 5):  # read from the first group; seek
        with pytest.raises(ValueError, match="no row survives on_bad_row=skip"):
            next(source_for(overrides).train_batches(0, 2, start, start + 1))


def test_every_rank_alone_finds_the_same_eval_count(data):
    """Without a count agreed over ranks, each rank counts every rank's surviving rows."""
    counts = [len(list(source_for(data["bad"]).eval_batches(rank, 2))) for rank in (0, 1)]
    assert counts == [4, 4]


def _evaluate_on_two_ranks(rank: int, world_size: int, overrides: list[str]) -> None:
    config = compose_config(overrides)
    groups = feature_groups(config.features, config.hashing)
    context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    source, _ = build_data_source(config, groups, context)
    batches = list(source.eval_batches(rank, world_size))
    sizes = [len(batch.labels) for batch in batches]
    batch_counts = gather_stack(torch.tensor(len(sizes))).tolist()
    # Rank 0 keeps 174 eval rows (3 batches), rank 1 205 (4): both run 4, padded to B.
    assert batch_counts == [4, 4], batch_counts
    assert sizes == [BATCH] * 4
    real = sum(int((batch.labels >= 0).sum()) for batch in batches)
    assert real == (174 if rank == 0 else 205)
    assert source.skipped_rows == (30 if rank == 0 else 0)


def test_with_bad_rows_on_one_rank_every_rank_runs_the_same_eval_batches(data):
    run_ranks(_evaluate_on_two_ranks, 2, data["bad"])


def test_two_rank_job_with_skipped_rows_evaluates_between_segments(data, tmp_path):
    """python -m train on 2 ranks: evaluations between segments, bad rows on both splits."""
    torchrun = os.path.join(os.path.dirname(os.sys.executable), "torchrun")
    result = run_train(
        [*data["bad"], "trainer.steps=12", "trainer.eval_every=6", "data.prefetch_batches=0"],
        cwd=tmp_path, timeout=300,
        launcher=[torchrun, "--standalone", "--nproc_per_node", "2"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(tmp_path)
    # Every surviving eval row once: 409 less the 30 bad ones.
    assert [e["num_samples"] for e in summary["evals"]] == [409 - 30] * 2
    assert summary["skipped_rows"] > 30
