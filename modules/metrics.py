"""Click-model metrics on plain tensors: exact AUC, log loss, normalized entropy."""

from __future__ import annotations

import math

import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC (Mann-Whitney U with tied scores given their average rank).

    Args:
        scores: float [N], any monotone score (logits or probabilities).
        labels: float or int [N] of 0/1.
    Returns:
        AUC in [0, 1]; NaN when only one class is present.
    """
    scores = scores.double().flatten()
    labels = labels.double().flatten()
    num_positive = float(labels.sum())
    num_negative = float(labels.numel()) - num_positive
    if num_positive == 0 or num_negative == 0:
        return math.nan
    sorted_scores, order = torch.sort(scores)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    # 1-based rank of each tie group's first element, then the group's average rank.
    starts = torch.cumsum(counts, 0) - counts + 1
    average_ranks = starts.double() + (counts.double() - 1.0) / 2.0
    ranks = torch.repeat_interleave(average_ranks, counts)
    positive_rank_sum = float((ranks * labels[order]).sum())
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
