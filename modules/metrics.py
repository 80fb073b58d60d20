"""Click-model metrics on plain tensors: exact AUC, log loss, normalized entropy, calibration
and click-through rates.

Each takes every prediction at once (no streaming state), so the figure is exact over the
samples given; ``click_metrics`` returns all of them for one set of predictions. They run on
the tensors' own device; reading the result is one host-device sync per figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC (Mann-Whitney U with tied scores given their average rank).

    One sort of the scores, then linear passes over their tie groups: O(n log n) time. Exact while the rank sum fits a double's
    integers, below about 90M samples: the result is then the exact fraction of (positive,
    negative) pairs ranked right, a tie counting half, rounded once.

    Args:
        scores: [N] of any real dtype, any monotone score (logits or probabilities).
        labels: float or int [N] of 0/1.
    Returns:
        AUC in [0, 1]; NaN when only one class is present.
    """
    scores = scores.flatten()
    labels = labels.flatten()
    num_positive = float(labels.sum(dtype=torch.float64))
    num_negative = float(labels.numel()) - num_positive
    if num_positive == 0 or num_negative == 0:
        return math.nan
    # Sorted in their own dtype: widening is exact and keeps order and ties. Each step frees
    # what the next does not need: at 10M samples every [N] int64 or float64 is 80 MB.
    sorted_scores, order = torch.sort(scores)
    sorted_labels = labels[order]
    del order
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)  # per tie group
    del _, sorted_scores
    last = torch.cumsum(counts, 0).sub_(1)  # each group's last position
    group_positives = torch.cumsum(sorted_labels, 0, dtype=torch.float64)[last]
    del sorted_labels
    group_positives[1:] -= group_positives[:-1].clone()  # positives up to the end -> per group
    # A group's average 1-based rank, (first + last) / 2 + 1 = last + 1 - (count - 1) / 2.
    average_ranks = counts.double().sub_(1.0).div_(-2.0).add_(last).add_(1.0)
    del counts, last
    positive_rank_sum = float(torch.dot(average_ranks, group_positives))
    return (positive_rank_sum - num_positive * (num_positive + 1) / 2) / (
        num_positive * num_negative
    )


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of logits [N] against 0/1 labels [N], in nats."""
    return float(
        torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double())
    )


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Log loss divided by the entropy of the base click rate (He et al. 2014): below 1
    means better than always predicting the average CTR."""
    ctr = float(labels.double().mean())
    if ctr <= 0.0 or ctr >= 1.0:
        return math.nan
    base_entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    return log_loss(logits, labels) / base_entropy


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Predicted clicks over actual clicks, sum(sigmoid(logits)) / sum(labels), from logits [N]
    and 0/1 labels [N]: 1 is calibrated, above 1 over-predicts. NaN without clicks."""
    clicks = float(labels.double().sum())
    if clicks == 0:
        return math.nan
    return float(torch.sigmoid(logits.double()).sum()) / clicks


def click_rate(labels: torch.Tensor) -> float:
    """The actual CTR: the mean of 0/1 labels [N]."""
    return float(labels.double().mean())


def predicted_click_rate(logits: torch.Tensor) -> float:
    """The predicted CTR: the mean of sigmoid(logits) [N]."""
    return float(torch.sigmoid(logits.double()).mean())


@dataclass
class ClickMetrics:
    """Every figure of one set of predictions (field names are summary.json's)."""

    auc: float
    normalized_entropy: float
    log_loss: float
    calibration: float
    ctr: float
    predicted_ctr: float
    num_samples: int


def click_metrics(logits: torch.Tensor, labels: torch.Tensor) -> ClickMetrics:
    """AUC, NE, log loss, calibration, actual and predicted CTR of logits [N] against 0/1
    labels [N]."""
    return ClickMetrics(
        auc=auc(logits, labels),
        normalized_entropy=normalized_entropy(logits, labels),
        log_loss=log_loss(logits, labels),
        calibration=calibration(logits, labels),
        ctr=click_rate(labels),
        predicted_ctr=predicted_click_rate(logits),
        num_samples=labels.numel(),
    )
