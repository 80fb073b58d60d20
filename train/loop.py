"""The training loop on TorchRec's TrainPipelineSparseDist, with periodic evaluation.

The pipeline keeps up to three batches in flight: while batch i runs forward/backward, the
input distribution (all-to-all of IDs) of batch i+1 is under way and batch i+2 is loaded.
Training runs in segments between evaluations; at a segment's end the pipeline drains, the
model switches to eval mode, the same pipeline runs the held-out batches without backward,
and training resumes.

No host-device sync in a training step except on logging steps (every ``log_every`` steps and
at a segment's end): losses stay device tensors until a report, the ID mappers' range errors
wait on the device until then (``train/id_range_checks.py``), batches carry their per-key sizes
from the host (``modules/batch.py``), and the stop-signal vote runs on a host-side group
(``train/checkpoint_policy.py``). ``tests/test_host_syncs.py`` counts them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from modules.batch import Batch
from modules.metrics import ClickMetrics, click_metrics
from train.collectives import (
    gather_concat,
    gather_concat_on_rank_zero,
    gather_stack,
    global_mean,
    on_rank_zero,
)
from train.distributed import DistributedContext
from train.id_range_checks import deferred_id_range_errors, raise_if_ids_out_of_range
from train.metrics_logger import MetricsLogger
from train.optimizers import WarmupDecaySchedule
from train.progress import Progress
from train.step_stats import (
    TimedIterator,
    Window,
    rank_figures,
    rank_table,
    window_metrics,
)
from train.window_quality import PredictionWindow, window_quality
from train.system_info import measured_embedding_bytes

# Steps excluded from throughput at the start of a run (planner caches, allocator warm-up).
WARMUP_STEPS = 10


def eval_scores(logits: torch.Tensor, labels: torch.Tensor) -> ClickMetrics:
    """The eval figures over every rank's samples, from this rank's logits and labels ([N]
    each, the same N on every rank), on every rank. A collective: every rank must call it.

    Only rank 0 receives all ranks' samples (8 bytes each: 80 MB at 10M samples) and sorts
    them for the exact AUC; it hands the figures, or its error, to the others, which hold no
    copy of the samples and sort nothing (costs in docs/performance.md, "Evaluation").
    """
    predictions = torch.stack([logits.float(), labels.float()], dim=1)  # [N, 2]: one gather
    return on_rank_zero(_score_real_rows, gather_concat_on_rank_zero(predictions))


def _score_real_rows(predictions: torch.Tensor) -> ClickMetrics:
    """click_metrics of [N, 2] (logit, label) rows, on the host. Rows that only pad a rank's
    last batches (a negative label, see modules/data_sources/parquet.py) are no eval rows:
    every real row counts once."""
    predictions = predictions.cpu()
    logits, labels = predictions[:, 0], predictions[:, 1]
    real = labels >= 0
    return click_metrics(logits[real], labels[real])


@dataclass
class EvalResult:
    """One evaluation over every rank's eval samples (summary.json's ``evals`` entries)."""

    step: int
    auc: float
    normalized_entropy: float
    log_loss: float
    num_samples: int
    seconds: float = 0.0
    # Predicted clicks / actual clicks (1 = calibrated), actual and predicted click rates.
    calibration: float = math.nan
    ctr: float = math.nan
    predicted_ctr: float = math.nan


@dataclass
class TrainResult:
    steps: int
    samples: int
    samples_per_sec: float
    train_loss: float
    evals: list[EvalResult] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass
class TrainingParts:
    """What to train: the (sharded) model, its optimizer and the learning-rate schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupDecaySchedule


@dataclass
class DataFeed:
    """This rank's batches: ``train_batches(start_step, stop_step)`` and ``eval_batches()``
    (the same count on every rank), each of ``batch_size`` samples; ``num_eval_batches`` sizes
    the eval progress bar (None: unknown)."""

    train_batches: Callable[[int, int], Iterator[Batch]]
    eval_batches: Callable[[], Iterator[Batch]]
    batch_size: int
    num_eval_batches: int | None = None


@dataclass
class Reporting:
    """How the loop reports: gathered figures every ``log_every`` steps, logged by rank 0
    through ``metrics`` (None: not logged) and printed with ``print_fn``; ``planned_embedding_
    bytes`` per rank (the plan's figure, next to the measured one in mem/ keys)."""

    log_every: int
    print_fn: Callable[[str], None]
    metrics: MetricsLogger | None = None
    progress_bar: bool = True
    planned_embedding_bytes: list[int] | None = None
    # Above this many ranks, per-rank figures are logged as min / median / max over ranks
    # plus one perf/rank_table per report instead of one key per rank.
    per_rank_keys_max_world_size: int = 8


class TrainingHook:
    """Work the loop hands off, called on every rank at the same points, so a hook may use
    collectives: ``before_training`` once before the first step (the global step training
    starts at), ``after_step`` after every training step (True stops training with
    TrainingStopped), ``after_eval`` after every evaluation (extra metrics to log with the
    eval/ keys, full keys included, e.g. {"hash/user_id/collision_rate": 0.012}; rank 0's are
    logged). ``after_training`` runs when training ends, also on an error: no collectives
    there. The loop calls every hook at every point, whatever the others return."""

    def before_training(self, start_step: int) -> None:
        pass

    def after_step(self, step: int) -> bool:
        return False

    def after_eval(self, step: int) -> dict[str, float]:
        return {}

    def after_training(self) -> None:
        pass


# The range around each training step in a profile (trainer.profile, train/profiling.py).
STEP_RANGE = "train_step"


def step_range() -> ContextManager[Any]:
    """A ``train_step`` range while a profiler records, else nothing: without a profiler a
    step pays one flag read, not a record_function."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(STEP_RANGE)
    return contextlib.nullcontext()


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``train/lr/<optimizer>`` for each part of a CombinedOptimizer (first param group's lr:
    the schedule scales every group alike), else ``train/lr/group<i>``."""
    parts = getattr(optimizer, "optimizers", None)
    if parts:
        return {
            f"train/lr/{name}": float(part.param_groups[0]["lr"])
            for name, part in parts
            if part.param_groups
        }
    return {f"train/lr/group{i}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


class _NoDistStreamOnCpu(logging.Filter):
    """Drops TorchRec's "Postproc module ... has no dist stream" warning on CPU.

    On CUDA, TrainPipelineSparseDist hands every pipelined postproc (our ID mappers) its
    data-dist stream, and the warning would mean a real race between streams. A CPU pipeline
    has no streams at all: every op runs in issue order, so there is nothing to race.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dist stream" not in record.getMessage()


_POSTPROC_LOGGER = logging.getLogger("torchrec.distributed.train_pipeline.postproc")


def quiet_postproc_stream_warning(device: torch.device) -> None:
    """Install the filter once per process, on CPU only."""
    if device.type == "cpu" and not any(
        isinstance(f, _NoDistStreamOnCpu) for f in _POSTPROC_LOGGER.filters
    ):
        _POSTPROC_LOGGER.addFilter(_NoDistStreamOnCpu())


class TrainingStopped(Exception):
    """Training stopped early on request (a pre-emption signal); the step is in ``args[0]``."""


class Trainer:
    """Runs ``steps`` training steps with an evaluation every ``eval_every`` steps.

    Every ``reporting.log_every`` steps (and at each segment's end) all ranks gather their
    throughput, step-time split and memory (one all_gather, see ``train/step_stats.py``) and
    rank 0 logs them and reports progress; each evaluation logs ``eval/`` keys plus whatever
    the hooks' ``after_eval`` return.
    """

    def __init__(
        self,
        parts: TrainingParts,
        context: DistributedContext,
        data: DataFeed,
        reporting: Reporting,
        hooks: Sequence[TrainingHook] = (),
    ) -> None:
        self.model = parts.model
        self.optimizer = parts.optimizer
        self.schedule = parts.schedule
        self.context = context
        self.data = data
        self.reporting = reporting
        self.hooks = list(hooks)
        self.batch_size = data.batch_size
        self.log_every = reporting.log_every
        self.metrics = reporting.metrics
        self.planned_embedding_bytes = (
            reporting.planned_embedding_bytes or [0] * context.world_size
        )
        self.progress = Progress(enabled=False, total_steps=0)
        self._measured_embedding_bytes: list[int] | None = None
        quiet_postproc_stream_warning(context.device)
        # On CUDA the pipeline gives the mappers (postprocs) its data-dist stream itself.
        self.pipeline = TrainPipelineSparseDist(
            self.model,
            self.optimizer,
            context.device,
            execute_all_batches=True,
            # Runs the raw-ID -> row mapping as a pipelined postproc so the EBCs stay pipelined.
            pipeline_postproc=True,
        )

    def _after_step(self, step: int) -> bool:
        """Every hook, on every rank (hooks may use collectives); True = some hook stops."""
        stops = [hook.after_step(step) for hook in self.hooks]
        return any(stops)

    def _after_eval(self, step: int) -> dict[str, float]:
        """Every hook's extra eval metrics, on every rank (hooks may use collectives)."""
        extras: dict[str, float] = {}
        for hook in self.hooks:
            extras.update(hook.after_eval(step))
        return extras

    def _run_segment(self, start: int, stop: int, losses: deque[torch.Tensor]) -> None:
        """Train steps [start, stop). Loss, logit and label tensors are kept, not converted:
        converting is a host-device sync on GPU, done only at reports (every log_every steps)."""
        self.model.train()
        self.pipeline.reset()
        # The pipeline pulls batches inside progress(); timing next() splits data wait
        # from forward + backward + optimizer.
        # Closed however the segment ends (a stop, an error): the prefetch thread is joined
        # here, not left to the garbage collector at interpreter exit, where a thread still in
        # torch's C++ aborts the process (modules/prefetch.py).
        with closing(TimedIterator(self.data.train_batches(start, stop))) as batches:
            window = Window.open(start, batches)
            self.progress.start_training(start)
            with deferred_id_range_errors(self.model):
                for step in range(start, stop):
                    # The fused embedding optimizer takes the new lr in zero_grad() in progress().
                    self.schedule.set_step(step)
                    with step_range():
                        loss, logits, labels = self.pipeline.progress(batches)
                    losses.append(loss)
                    self.predictions.add(logits, labels)
                    self.progress.advance()
                    if (step + 1) % self.log_every == 0 or step + 1 == stop:
                        self._report(step + 1, window, batches, losses)
                        window = Window.open(step + 1, batches)
                    if self._after_step(step + 1):
                        raise TrainingStopped(step + 1)

    def _report(
        self, step: int, window: Window, batches: TimedIterator, losses: deque[torch.Tensor]
    ) -> None:
        """Gather every rank's figures for the window ending at ``step``; rank 0 logs them.
        Every rank calls this at the same steps (a collective)."""
        # A logging step synchronises anyway: bad IDs any rank met since the last one stop all.
        raise_if_ids_out_of_range(self.model)
        num_steps = step - window.start_step
        window_loss = torch.stack(list(losses)[-num_steps:]).mean()
        figures = rank_figures(
            window, step, batches, window_loss, self.batch_size, self.context.device
        )
        # Every rank's figures, [world_size, len(RANK_FIGURES)] on the host: the one
        # host-device sync of the window.
        per_rank = gather_stack(figures).cpu()
        # Every rank's logits and labels of the window, [world_size, 2, N], left on the device
        # (a second all_gather, of 8 bytes per sample): rank 0 scores them where they are.
        predictions = gather_stack(self.predictions.last(num_steps))
        if not self.context.is_main:
            return
        world_size = self.context.world_size
        per_rank_keys = world_size <= self.reporting.per_rank_keys_max_world_size
        metrics = window_metrics(
            per_rank,
            batch_size=self.batch_size,
            num_steps=num_steps,
            on_cuda=self.context.device.type == "cuda",
            planned_embedding_bytes=self.planned_embedding_bytes,
            measured_embedding_bytes=self._measured_embedding_bytes,
            per_rank_keys=per_rank_keys,
        )
        metrics.update(window_quality(predictions))
        lrs = learning_rates(self.optimizer)
        metrics.update(lrs)
        if self.metrics is not None:
            self.metrics.log(metrics, step)
            if not per_rank_keys:
                table = rank_table(
                    per_rank,
                    on_cuda=self.context.device.type == "cuda",
                    planned_embedding_bytes=self.planned_embedding_bytes,
                    measured_embedding_bytes=self._measured_embedding_bytes,
                )
                self.metrics.log_table("perf/rank_table", *table, step=step)
        self.progress.report(
            step,
            loss=metrics["train/loss"],
            samples_per_sec=metrics["perf/samples_per_sec"],
            lr=next(iter(lrs.values()), math.nan),
        )

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalResult:
        started = time.perf_counter()
        self.model.eval()
        self.pipeline.reset()
        batches = self.data.eval_batches()
        logits, labels = [], []
        self.progress.start_eval(self.data.num_eval_batches)
        with deferred_id_range_errors(self.model):
            while True:
                try:
                    _, batch_logits, batch_labels = self.pipeline.progress(batches)
                except StopIteration:
                    break
                logits.append(batch_logits)
                labels.append(batch_labels)
                self.progress.eval_advance()
        self.progress.end_eval()
        self.pipeline.reset()
        raise_if_ids_out_of_range(self.model)
        self.model.train()
        scores = eval_scores(torch.cat(logits), torch.cat(labels))
        result = EvalResult(
            step=step,
            auc=scores.auc,
            normalized_entropy=scores.normalized_entropy,
            log_loss=scores.log_loss,
            num_samples=scores.num_samples,
            seconds=time.perf_counter() - started,
            calibration=scores.calibration,
            ctr=scores.ctr,
            predicted_ctr=scores.predicted_ctr,
        )
        extras = self._after_eval(step)
        if self.metrics is not None:
            self.metrics.log(
                {
                    "eval/auc": result.auc,
                    "eval/ne": result.normalized_entropy,
                    "eval/log_loss": result.log_loss,
                    "eval/calibration": result.calibration,
                    "eval/ctr": result.ctr,
                    "eval/predicted_ctr": result.predicted_ctr,
                    "eval/num_samples": result.num_samples,
                    "perf/eval_seconds": result.seconds,
                    **extras,
                },
                step,
            )
        line = (
            f"eval  step {step:>7}  auc {result.auc:.4f}  ne {result.normalized_entropy:.4f}  "
            f"logloss {result.log_loss:.4f}  ({result.num_samples:,} samples)"
        )
        if self.context.is_main:
            self.progress.write(line)
        return result

    def train(self, steps: int, eval_every: int, start_step: int = 0) -> TrainResult:
        """Steps [start_step, steps); start_step > 0 continues a resumed run."""
        self.progress = Progress(
            enabled=self.context.is_main,
            total_steps=steps,
            use_bar=None if self.reporting.progress_bar else False,
            print_fn=self.reporting.print_fn,
        )
        # Measured once (a collective): what each rank really holds for its tables, next to
        # the plan's figure in every mem/ report.
        measured = torch.tensor(
            [measured_embedding_bytes(self.model, self.optimizer)], dtype=torch.int64,
            device=self.context.device,
        )
        self._measured_embedding_bytes = [int(v) for v in gather_concat(measured).cpu()]
        for hook in self.hooks:
            hook.before_training(start_step)
        try:
            return self._train(steps, eval_every, start_step)
        finally:
            for hook in self.hooks:
                hook.after_training()
            self.progress.close()

    def _train(self, steps: int, eval_every: int, start_step: int) -> TrainResult:
        self._total_steps = steps
        boundaries = list(range(eval_every, steps, eval_every)) if eval_every > 0 else []
        boundaries = [b for b in boundaries if b > start_step] + [steps]
        warmup_end = start_step + WARMUP_STEPS
        losses: deque[torch.Tensor] = deque(maxlen=max(self.log_every, 1))
        self.predictions = PredictionWindow(max(self.log_every, 1))
        evals: list[EvalResult] = []
        timed_seconds = 0.0
        timed_steps = 0
        start = start_step
        for stop in boundaries:
            # Time only training, after the first WARMUP_STEPS steps of this process.
            if start < warmup_end < stop:
                self._run_segment(start, warmup_end, losses)
                start_timed = warmup_end
            else:
                start_timed = start
            if start_timed < stop:
                segment_clock = time.perf_counter()
                self._run_segment(start_timed, stop, losses)
                if start_timed >= warmup_end:
                    timed_seconds += time.perf_counter() - segment_clock
                    timed_steps += stop - start_timed
            evals.append(self.evaluate(stop))
            start = stop
        # A run resumed at its last step trains nothing: it only evaluates and reports.
        train_loss = (
            global_mean(float(torch.stack(list(losses)).mean()), self.context.device)
            if losses
            else math.nan
        )
        samples_per_step = self.batch_size * self.context.world_size
        # Global throughput: every rank trains its own batch_size samples per step.
        samples_per_sec = (
            global_mean(timed_steps * samples_per_step / timed_seconds, self.context.device)
            if timed_seconds > 0
            else math.nan
        )
        return TrainResult(
            steps=steps,
            samples=steps * samples_per_step,
            samples_per_sec=samples_per_sec,
            train_loss=train_loss,
            evals=evals,
            train_seconds=timed_seconds,
        )
