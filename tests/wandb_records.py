"""Read a W&B run file (``run-<id>.wandb``) back, for tests: wandb 0.31 ships no Python reader.

The file is a 7-byte header (``:W&B``, a 2-byte magic, a version byte) and then the LevelDB
log format: 32 KiB blocks; each record is a 7-byte frame (4-byte checksum, 2-byte
little-endian length, 1-byte type) and its payload; a payload that does not fit in what is
left of a block is split into first / middle / last pieces; a block tail shorter than a frame
is zero padding. Each reassembled payload is one ``wandb_internal_pb2.Record``, decoded here
with W&B's own protobuf class. Checksums are verified: a test must not pass on garbage.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

HEADER_BYTES = 7
HEADER_IDENT = b":W&B"
BLOCK_BYTES = 32 * 1024
FRAME_BYTES = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptRunFile(ValueError):
    pass


def _checksum(record_type: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes([record_type]))) & 0xFFFFFFFF


def read_payloads(path: str | Path) -> Iterator[bytes]:
    """Every record payload of the file, pieces joined, checksums verified."""
    data = Path(path).read_bytes()
    if data[:4] != HEADER_IDENT:
        raise CorruptRunFile(f"{path}: no ':W&B' header")
    position = HEADER_BYTES
    pending: bytearray | None = None
    while position + FRAME_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < FRAME_BYTES:  # zero padding at the end of a block
            position += left_in_block
            continue
        checksum, length, record_type = struct.unpack_from("<IHB", data, position)
        if checksum == 0 and length == 0 and record_type == 0:  # unwritten tail
            break
        start = position + FRAME_BYTES
        payload = data[start : start + length]
        if len(payload) != length:
            raise CorruptRunFile(f"{path}: record at byte {position} runs past the end")
        if _checksum(record_type, payload) != checksum:
            raise CorruptRunFile(f"{path}: bad checksum at byte {position}")
        position = start + length
        if record_type == FULL:
            yield payload
        elif record_type == FIRST:
            pending = bytearray(payload)
        elif record_type in (MIDDLE, LAST):
            if pending is None:
                raise CorruptRunFile(f"{path}: piece without a first piece at byte {position}")
            pending += payload
            if record_type == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise CorruptRunFile(f"{path}: unknown record type {record_type}")


def read_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    for payload in read_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _value(value_json: str) -> Any:
    return json.loads(value_json)


def _key(item: Any) -> str:
    """An item's key: W&B stores nested keys as ``nested_key`` pieces, flat ones as ``key``."""
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class Artifact:
    """An artifact record: what ``run.log_artifact`` logged (files listed, not read)."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict[str, Any]
    paths: list[str]  # each entry's path inside the artifact
    references: list[str]  # each entry's reference URI ("" when uploaded)


@dataclass
class RunFile:
    """What a run file says: history rows, config, summary, files, the run's id, job type,
    notes, ``define_metric`` settings and artifacts."""

    run_id: str = ""
    project: str = ""
    job_type: str = ""
    notes: str = ""
    # define_metric records by name (glob ones by their glob): step_metric, hidden, summary
    # (the aggregations it keeps, e.g. {"max", "last"}).
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None

    def keys(self) -> set[str]:
        return {key for row in self.history for key in row}

    def values(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def read_run(path: str | Path) -> RunFile:
    """Decode a ``run-<id>.wandb`` file into history rows, config and summary."""
    run = RunFile()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.project = record.run.project
            run.job_type = record.run.job_type
            run.notes = record.run.notes
            for item in record.run.config.update:
                run.config[_key(item)] = _value(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = _value(item.value_json)
        elif kind == "history":
            row = {_key(item): _value(item.value_json) for item in record.history.item}
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = _value(item.value_json)
        elif kind == "files":
            run.files += [item.path for item in record.files.files]
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "metric":
            metric = record.metric
            summary = {field.name for field, on in metric.summary.ListFields() if on is True}
            run.metrics[metric.name or metric.glob_name] = {
                "step_metric": metric.step_metric,
                "hidden": metric.options.hidden,
                "summary": summary,
            }
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append(Artifact(
                name=artifact.name,
                type=artifact.type,
                aliases=list(artifact.aliases),
                metadata=json.loads(artifact.metadata) if artifact.metadata else {},
                paths=[entry.path for entry in artifact.manifest.contents],
                references=[entry.ref for entry in artifact.manifest.contents],
            ))
    return run


def find_run_files(root: str | Path) -> list[Path]:
    """Every run file under root (``latest-run`` is a link to one of them: skipped)."""
    return sorted(
        path for path in Path(root).glob("**/run-*.wandb") if "latest-run" not in path.parts
    )
