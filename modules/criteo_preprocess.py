"""Resumable, multi-process preprocessing of raw Criteo files into numpy shards.

Inputs are cut into tasks (a byte range of at most ``task_bytes`` of a plain file, or a whole
.gz file); worker processes parse tasks in blocks of ``rows_per_shard`` rows, so memory stays
bounded whatever the input size. A finished task leaves a small ``*.done.json`` marker, so an
interrupted run resumes where it stopped; ``manifest.json`` is written last and lists the
shards in input order. The CLI is scripts/preprocess_criteo.py.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from modules.criteo import SplitManifest, open_text, parse_lines, write_shard


@dataclass(frozen=True)
class Task:
    path: str
    start_byte: int  # first line starting at or after this byte (plain files)
    end_byte: int  # lines starting before this byte; -1 = to the end
    stem: str
    line_fraction: tuple[float, float]  # only for whole-file tasks


def plan_tasks(paths: list[Path], task_bytes: int, line_fraction: tuple[float, float]) -> list[Task]:
    tasks = []
    for path in paths:
        size = path.stat().st_size
        whole = path.suffix == ".gz" or line_fraction != (0.0, 1.0) or size <= task_bytes
        if whole:
            tasks.append(Task(str(path), 0, -1, path.name.replace(".", "_"), line_fraction))
            continue
        for index, start in enumerate(range(0, size, task_bytes)):
            tasks.append(
                Task(str(path), start, min(size, start + task_bytes),
                     f"{path.name.replace('.', '_')}-p{index:05d}", (0.0, 1.0))
            )
    return tasks


def _count_lines(path: Path) -> int:
    with open_text(path) as handle:
        return sum(1 for _ in handle)


def _lines_before(path: Path, byte: int) -> int:
    count = 0
    with open(path, "rb") as handle:
        remaining = byte
        while remaining > 0:
            chunk = handle.read(min(remaining, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count


def _task_lines(task: Task):
    """(first line number, iterator over the task's lines)."""
    path = Path(task.path)
    if task.end_byte < 0:
        lo, hi = task.line_fraction
        if (lo, hi) == (0.0, 1.0):
            return 1, open_text(path)
        total = _count_lines(path)
        first, last = int(total * lo), int(total * hi)
        return first + 1, islice(open_text(path), first, last)
    handle = open(path, "rb")
    line_number = 1
    if task.start_byte > 0:
        handle.seek(task.start_byte - 1)
        if handle.read(1) != b"\n":
            handle.readline()  # finish the line that started in the previous task
        line_number = _lines_before(path, handle.tell()) + 1

    def lines():
        with handle:
            while handle.tell() < task.end_byte:
                raw = handle.readline()
                if not raw:
                    return
                yield raw.decode("utf-8")

    return line_number, lines()


def run_task(task: Task, out_dir: str, rows_per_shard: int, skip_bad_rows: bool) -> dict:
    """Parse one task into shards; write its done-marker last."""
    out = Path(out_dir)
    marker = out / f"{task.stem}.done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    first_line, lines = _task_lines(task)
    source = Path(task.path).name
    shards, rows, skipped = [], 0, 0
    while True:
        chunk = list(islice(lines, rows_per_shard))
        if not chunk:
            break
        block, bad = parse_lines(iter(chunk), source, first_line, skip_bad_rows)
        first_line += len(chunk)
        skipped += bad
        if block.num_rows:
            stem = f"{task.stem}-{len(shards):04d}"
            write_shard(out, stem, block)
            shards.append(stem)
            rows += block.num_rows
    result = {"shards": shards, "rows": rows, "skipped_rows": skipped}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, marker)
    return result


def preprocess(
    inputs: list[Path],
    out_dir: Path,
    workers: int = 1,
    rows_per_shard: int = 250_000,
    skip_bad_rows: bool = False,
    task_bytes: int = 64 << 20,
    line_fraction: tuple[float, float] = (0.0, 1.0),
    progress: bool = True,
) -> SplitManifest:
    """Preprocess ``inputs`` into ``out_dir`` (resumable); returns the manifest."""
    missing = [str(path) for path in inputs if not path.exists()]
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = plan_tasks(inputs, task_bytes, line_fraction)
    results: dict[str, dict] = {}
    total_bytes = sum(Path(t.path).stat().st_size if t.end_byte < 0 else t.end_byte - t.start_byte for t in tasks)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress, desc=out_dir.name)
    if workers <= 1:
        for task in tasks:
            results[task.stem] = run_task(task, str(out_dir), rows_per_shard, skip_bad_rows)
            bar.update(Path(task.path).stat().st_size if task.end_byte < 0 else task.end_byte - task.start_byte)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {
                pool.submit(run_task, task, str(out_dir), rows_per_shard, skip_bad_rows): task
                for task in tasks
            }
            for future in as_completed(futures):
                task = futures[future]
                results[task.stem] = future.result()
                bar.update(Path(task.path).stat().st_size if task.end_byte < 0 else task.end_byte - task.start_byte)
    bar.close()
    manifest = SplitManifest(
        shards=[stem for task in tasks for stem in results[task.stem]["shards"]],
        rows=sum(result["rows"] for result in results.values()),
        skipped_rows=sum(result["skipped_rows"] for result in results.values()),
    )
    manifest.save(out_dir)
    return manifest
