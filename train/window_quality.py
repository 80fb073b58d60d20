"""Train AUC / NE / calibration / CTR over each report window, from logits already on the device.

Every training step returns its logits and labels (``ClickModelTrain``); ``PredictionWindow``
keeps references to the last ``log_every`` steps' tensors where they are. Appending a reference
launches no kernel and reads nothing, so a step gains no host-device sync. At a report (a
logging step, which syncs anyway) the loop gathers the window's [2, N] logits and labels from
every rank and rank 0 scores them with the exact metrics of ``modules/metrics.py`` on the device
the tensors are on.
"""

from __future__ import annotations

from collections import deque

import torch

from modules.metrics import click_metrics


class PredictionWindow:
    """The logits and labels of the last ``max_steps`` training steps, on their device."""

    def __init__(self, max_steps: int) -> None:
        self.steps: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max_steps)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One step's logits [B] and 0/1 labels [B]; kept by reference (no copy, no sync)."""
        self.steps.append((logits.detach(), labels))

    def last(self, num_steps: int) -> torch.Tensor:
        """[2, N] float32: the logits (row 0) and labels (row 1) of the last ``num_steps``
        steps in step order, N their samples, on the tensors' device."""
        if not 0 < num_steps <= len(self.steps):
            raise ValueError(f"the window holds {len(self.steps)} steps, asked for {num_steps}")
        recent = list(self.steps)[-num_steps:]
        logits = torch.cat([step_logits.flatten() for step_logits, _ in recent])
        labels = torch.cat([step_labels.flatten() for _, step_labels in recent])
        return torch.stack([logits.float(), labels.float()])


def window_quality(predictions: torch.Tensor) -> dict[str, float]:
    """``train/auc``, ``train/ne``, ``train/calibration``, ``train/ctr`` of every rank's
    window, from the gathered [world_size, 2, N] predictions (``PredictionWindow.last``)."""
    logits = predictions[:, 0].flatten()
    labels = predictions[:, 1].flatten()
    scores = click_metrics(logits, labels)
    return {
        "train/auc": scores.auc,
        "train/ne": scores.normalized_entropy,
        "train/calibration": scores.calibration,
        "train/ctr": scores.ctr,
    }
