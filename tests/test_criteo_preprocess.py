"""Preprocessing one big plain file in byte-range tasks: the file is read about once, bad rows
are named by their line in the file, and a failure stops the queued tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.criteo_preprocess import preprocess
from modules.tabular import BadRowError
from tests.helpers import REPO

SAMPLE_TRAIN = REPO / "data" / "criteo_sample" / "train.tsv"  # 7,200 lines, 1.7 MB


def bytes_read_by_this_process() -> int:
    """Bytes this process has read through read() calls so far (Linux's rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_many_byte_range_tasks_read_the_file_about_once(tmp_path):
    size = SAMPLE_TRAIN.stat().st_size
    before = bytes_read_by_this_process()
    # 35 tasks, one process (so all the reading is counted here). Counting each task's line
    # number from the start of the file would read it about 17 times.
    manifest = preprocess([SAMPLE_TRAIN], tmp_path / "out", workers=1, task_bytes=50_000,
                          progress=False)
    read = bytes_read_by_this_process() - before
    assert manifest.rows == 7200
    # Slack: each task re-reads the line crossing its start and reads ahead one buffer past its
    # end (measured: 1.1 to 1.3 times the size).
    assert read < 2 * size, f"read {read / size:.1f} times the file's size"


def with_bad_label(tmp_path: Path, bad_line: int) -> Path:
    """The sample with line ``bad_line`` (1-based) labelled 2: same length, so byte offsets stay."""
    lines = SAMPLE_TRAIN.read_text().splitlines(keepends=True)
    lines[bad_line - 1] = "2" + lines[bad_line - 1][1:]
    path = tmp_path / "day_0"
    path.write_text("".join(lines))
    return path


# Tasks of exactly the first 1,000 lines' bytes: task 1 starts at the first byte of line 1001,
# so a task boundary falls exactly on a line start; later boundaries fall inside lines.
TASK_BYTES = len("".join(SAMPLE_TRAIN.read_text().splitlines(keepends=True)[:1000]).encode())


@pytest.mark.parametrize(
    "bad_line, line_fraction",
    [(1, (0.0, 1.0)), (1000, (0.0, 1.0)), (1001, (0.0, 1.0)), (1002, (0.0, 1.0)),
     (6543, (0.0, 1.0)), (7200, (0.0, 1.0)),
     (3601, (0.5, 1.0)), (6543, (0.5, 1.0))],  # whole-file tasks, starting at line 3601
)
def test_bad_row_is_named_by_its_line_in_the_file(tmp_path, bad_line, line_fraction):
    bad = with_bad_label(tmp_path, bad_line)
    # Shards of 300 rows: the bad row is rarely in a task's first block.
    options = dict(workers=2, rows_per_shard=300, task_bytes=TASK_BYTES,
                   line_fraction=line_fraction, progress=False)
    with pytest.raises(BadRowError) as error:
        preprocess([bad], tmp_path / "fail", **options)
    assert str(error.value) == f"day_0:{bad_line}: label must be 0 or 1, got '2'"
    assert not (tmp_path / "fail" / "manifest.json").exists()
    manifest = preprocess([bad], tmp_path / "skip", skip_bad_rows=True, **options)
    assert manifest.skipped_rows == 1
    assert manifest.rows == (7199 if line_fraction == (0.0, 1.0) else 3599)


def test_a_failing_task_stops_the_queued_tasks(tmp_path):
    bad = with_bad_label(tmp_path, 3)
    out = tmp_path / "out"
    # 35 tasks on 2 workers; the first fails at once.
    with pytest.raises(BadRowError, match="^day_0:3: "):
        preprocess([bad], out, workers=2, task_bytes=50_000, progress=False)
    # A few tasks already handed to the workers may finish; the rest must not run.
    assert len(list(out.glob("*.done.json"))) < 10
