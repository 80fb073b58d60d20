"""Score an input with an exported model, streaming, into a Parquet file (scripts/predict.py).

Blocks of rows (``modules/serving/readers.py``) go through the TorchScript model one batch at
a time; each batch's scores (and labels) are appended to the output with pyarrow's
ParquetWriter, so rows keep their input order and memory stays bounded. The output is written
under a temporary name beside the target and renamed when complete. With labels, AUC, NE and
log loss are computed over every scored row (``modules/metrics.py``; that keeps 5 bytes per
row: a float32 score and a uint8 label).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modules.metrics import auc, log_loss, normalized_entropy
from modules.serving.inputs import column_inputs
from modules.serving.readers import Skipped, read_blocks
from modules.serving.schema import load_exported


@dataclass
class Prediction:
    rows: int
    skipped: int
    seconds: float
    batch_seconds: list[float] = field(default_factory=list)
    metrics: dict[str, float] | None = None

    def latency_ms(self, quantile: float) -> float:
        return float(np.quantile(np.asarray(self.batch_seconds), quantile) * 1000.0)


class _Progress:
    """A one-line counter on a terminal (stderr), nothing otherwise."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.started = self.last = time.perf_counter()

    def update(self, rows: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            rate = rows / max(now - self.started, 1e-9)
            sys.stderr.write(f"\rscored {rows:,} rows  {rate:,.0f} rows/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def predict(
    model_path: Path,
    input_path: Path,
    out_path: Path,
    batch_size: int = 4096,
    on_bad_row: str = "fail",
    device: str = "cpu",
) -> Prediction:
    """Score every row of ``input_path`` into ``out_path`` (Parquet: ``score``, and ``label``
    when the input has labels). Raises BadRowError / ValueError / OSError with one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {batch_size}")
    if on_bad_row not in ("fail", "skip"):
        raise ValueError(f"--on-bad-row must be fail or skip, got {on_bad_row!r}")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"{out_path.parent}: no such directory for the output file")
    model, schema = load_exported(str(model_path), device)
    skipped = Skipped()
    blocks = read_blocks(input_path, schema, batch_size, on_bad_row == "skip", skipped)
    temporary = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    writer = None
    scores_seen: list[torch.Tensor] = []
    labels_seen: list[torch.Tensor] = []
    result = Prediction(rows=0, skipped=0, seconds=0.0)
    progress = _Progress()
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for index, block in enumerate(blocks):
                dense, values, lengths = column_inputs(block.dense, block.categorical)
                if index == 0:
                    # TorchScript's executor profiles the first calls and optimises after
                    # them (about a second each): warm it up outside the timed batches.
                    for _ in range(2):
                        model(dense.to(device), values.to(device), lengths.to(device))
                batch_started = time.perf_counter()
                scores = model(dense.to(device), values.to(device), lengths.to(device)).float()
                scores = scores.cpu()  # a device sync on GPU: the batch's latency ends here
                result.batch_seconds.append(time.perf_counter() - batch_started)
                columns = {"score": pa.array(scores.numpy())}
                if block.labels is not None:
                    columns["label"] = pa.array(np.asarray(block.labels))
                    labels_seen.append(torch.from_numpy(np.asarray(block.labels, dtype=np.uint8)))
                    scores_seen.append(scores)
                table = pa.table(columns)
                if writer is None:
                    writer = pq.ParquetWriter(str(temporary), table.schema)
                writer.write_table(table)
                result.rows += len(scores)
                progress.update(result.rows)
        if writer is None:  # no rows at all: still a valid, empty output
            pq.write_table(pa.table({"score": pa.array([], pa.float32())}), str(temporary))
        else:
            writer.close()
            writer = None
        os.replace(temporary, out_path)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        temporary.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    result.skipped = skipped.rows
    if labels_seen:
        scores = torch.cat(scores_seen).double()
        labels = torch.cat(labels_seen).double()
        # The metrics take logits: the scores' log-odds (float64, so no precision is lost).
        logits = torch.logit(scores.clamp(1e-12, 1 - 1e-12))
        result.metrics = {
            "auc": auc(scores, labels),
            "ne": normalized_entropy(logits, labels),
            "log_loss": log_loss(logits, labels),
        }
    return result
