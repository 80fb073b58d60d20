"""The training loop on TorchRec's TrainPipelineSparseDist, with periodic evaluation.

The pipeline keeps up to three batches in flight: while batch i runs forward/backward, the
input distribution (all-to-all of IDs) of batch i+1 is under way and batch i+2 is loaded.
Training runs in segments between evaluations; at a segment's end the pipeline drains, the
model switches to eval mode, the same pipeline runs the held-out batches without backward,
and training resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from modules.batch import Batch
from modules.metrics import auc, log_loss, normalized_entropy
from train.distributed import DistributedContext
from train.optimizers import WarmupDecaySchedule

# Steps excluded from throughput at the start of a run (planner caches, allocator warm-up).
WARMUP_STEPS = 10


@dataclass
class EvalResult:
    step: int
    auc: float
    normalized_entropy: float
    log_loss: float
    num_samples: int


@dataclass
class TrainResult:
    steps: int
    samples: int
    samples_per_sec: float
    train_loss: float
    evals: list[EvalResult] = field(default_factory=list)
    train_seconds: float = 0.0


def gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' [N] tensors concatenated in rank order (equal N on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


def global_mean(value: float, device: torch.device) -> float:
    """Mean of a float over ranks (a collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


class Trainer:
    """Runs ``steps`` training steps with an evaluation every ``eval_every`` steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupDecaySchedule,
        context: DistributedContext,
        train_batches: Callable[[int, int], Iterator[Batch]],
        eval_batches: Callable[[], Iterator[Batch]],
        batch_size: int,
        log_every: int,
        print_fn: Callable[[str], None],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.context = context
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.batch_size = batch_size
        self.log_every = log_every
        self.print = print_fn
        self.pipeline = TrainPipelineSparseDist(
            model,
            optimizer,
            context.device,
            execute_all_batches=True,
            # Runs the raw-ID -> row mapping as a pipelined postproc so the EBCs stay pipelined.
            pipeline_postproc=True,
        )

    def _run_segment(self, start: int, stop: int, losses: list[torch.Tensor]) -> None:
        """Train steps [start, stop). Loss tensors are kept, not converted: converting is a
        host-device sync on GPU, done only when printing."""
        self.model.train()
        self.pipeline.reset()
        batches = self.train_batches(start, stop)
        for step in range(start, stop):
            # The fused embedding optimizer picks the new lr up in zero_grad() inside progress().
            self.schedule.set_step(step)
            loss, _, _ = self.pipeline.progress(batches)
            losses.append(loss)
            if (step + 1) % self.log_every == 0 or step + 1 == stop:
                self._print_progress(step + 1, losses)

    def _print_progress(self, step: int, losses: list[torch.Tensor]) -> None:
        window = losses[-self.log_every :]
        mean_loss = float(torch.stack(window).mean())
        elapsed = time.perf_counter() - self._segment_clock
        done = step - self._clock_step
        rate = done * self.batch_size * self.context.world_size / elapsed if elapsed > 0 else 0.0
        self.print(
            f"step {step:>7}/{self._total_steps}  loss {mean_loss:.4f}  "
            f"{rate:,.0f} samples/s  lr {self.schedule.current_lrs()[0]:.4g}"
        )

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalResult:
        self.model.eval()
        self.pipeline.reset()
        batches = self.eval_batches()
        logits, labels = [], []
        while True:
            try:
                _, batch_logits, batch_labels = self.pipeline.progress(batches)
            except StopIteration:
                break
            logits.append(batch_logits)
            labels.append(batch_labels)
        self.pipeline.reset()
        self.model.train()
        all_logits = gather_concat(torch.cat(logits).float()).cpu()
        all_labels = gather_concat(torch.cat(labels).float()).cpu()
        result = EvalResult(
            step=step,
            auc=auc(all_logits, all_labels),
            normalized_entropy=normalized_entropy(all_logits, all_labels),
            log_loss=log_loss(all_logits, all_labels),
            num_samples=all_labels.numel(),
        )
        self.print(
            f"eval  step {step:>7}  auc {result.auc:.4f}  ne {result.normalized_entropy:.4f}  "
            f"logloss {result.log_loss:.4f}  ({result.num_samples:,} samples)"
        )
        return result

    def train(self, steps: int, eval_every: int) -> TrainResult:
        self._total_steps = steps
        boundaries = list(range(eval_every, steps, eval_every)) if eval_every > 0 else []
        boundaries.append(steps)
        losses: list[torch.Tensor] = []
        evals: list[EvalResult] = []
        timed_seconds = 0.0
        timed_steps = 0
        start = 0
        for stop in boundaries:
            # Time only training, after the first WARMUP_STEPS steps of the run.
            if start < WARMUP_STEPS < stop:
                self._segment_clock = time.perf_counter()
                self._clock_step = start
                self._run_segment(start, WARMUP_STEPS, losses)
                start_timed = WARMUP_STEPS
            else:
                start_timed = start
            if start_timed < stop:
                self._segment_clock = time.perf_counter()
                self._clock_step = start_timed
                self._run_segment(start_timed, stop, losses)
                if start_timed >= WARMUP_STEPS:
                    timed_seconds += time.perf_counter() - self._segment_clock
                    timed_steps += stop - start_timed
            evals.append(self.evaluate(stop))
            start = stop
        window = losses[-self.log_every :]
        train_loss = global_mean(float(torch.stack(window).mean()), self.context.device)
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
