"""Hooks the loop calls after every evaluation, on every rank: the hashing report and fixed
eval figures (the planted data's Bayes-optimal AUC)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from torch import nn

from modules.batch import Batch
from modules.features import FeatureGroupSpec
from train.hashing import hashing_report
from train.loop import TrainingHook
from train.metrics_logger import hashing_metrics


class HashingReportHook(TrainingHook):
    """hash/<feature>/<stat> after each eval, and the report summary.json keeps.

    ``hashing_report`` is a collective, so every rank measures at every eval. Without managed
    features the report is a fixed function of the eval window and the hashing: it is measured
    once and reused; managed features' rows follow their live maps, so they are measured again
    at every eval.
    """

    def __init__(
        self,
        groups: list[FeatureGroupSpec],
        embedding_optimizer: str,
        eval_batches: Callable[[], Iterator[Batch]],
        model: nn.Module,
    ) -> None:
        self.groups = groups
        self.embedding_optimizer = embedding_optimizer
        self.eval_batches = eval_batches
        self.model = model
        self.has_managed = any(f.hashing.method == "managed" for g in groups for f in g.features)
        self.latest: dict[str, dict[str, Any]] = {}

    def measure(self) -> dict[str, dict[str, Any]]:
        """The report now (a collective: every rank must call it)."""
        return hashing_report(
            self.groups, self.embedding_optimizer, self.eval_batches(), model=self.model
        )

    def after_eval(self, step: int) -> dict[str, float]:
        if not self.latest or self.has_managed:
            self.latest.update(self.measure())
        return hashing_metrics(self.latest)

    def final(self) -> dict[str, dict[str, Any]]:
        """The last eval's report, or one measured now when no eval ran (a collective)."""
        return dict(self.latest) or self.measure()


class FixedEvalMetrics(TrainingHook):
    """The same metrics after every eval (e.g. {"eval/bayes_auc": 0.756})."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    def after_eval(self, step: int) -> dict[str, float]:
        return dict(self.metrics)
