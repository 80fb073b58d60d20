"""run(cfg): one training job from a composed config to summary.json."""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from modules.batch import Batch
from modules.data_sources import DataSource
from modules.id_mapping import IdOutOfRangeError
from modules.prefetch import pin_batches_for, prefetched
from modules.tabular import BadRowError
from train.build import (
    ShardedJob,
    budget_choice,
    build_sharded_job,
    dense_autocast,
    feature_groups,
    meta_model_with_fused_optimizer,
    plan_for,
)
from train.checkpoint import CheckpointError, choose_checkpoint, load_checkpoint
from train.checkpoint_policy import CheckpointPolicy
from train.collectives import on_rank_zero, reduce_over_ranks
from train.config import Config, reject_unknown_keys
from train.cpu_affinity import physical_cores, pin_local_rank
from train.distributed import (
    DistributedContext,
    LaunchError,
    detect_launch,
    init_distributed,
    shutdown_distributed,
)
from train.eval_hooks import FixedEvalMetrics, HashingReportHook
from train.data import build_data_source
from train.hashing import format_budget, format_hashing
from train.hashing.budget import BudgetFacts, budget_facts
from train.loop import (
    DataFeed,
    Reporting,
    Trainer,
    TrainingHook,
    TrainingParts,
    TrainingStopped,
    TrainResult,
)
from train.metrics_logger import MetricsLogger, start_run_logging
from train.model_settings import model_settings_line
from train.optimizers import WarmupDecaySchedule
from train.parquet_features import (
    data_statistics,
    derived_features,
    derives_features,
    describe,
    fill_columns_from_schema,
    needs_statistics,
    save_statistics,
)
from train.planning import format_memory, plan_for_topology
from train.profiling import profiling_hooks
from train.rank_failures import watch_rank_failures
from train.run_dir import save_job_config, start_checkpoints
from train.run_lock import RunDirInUse, release_run_lock, take_run_lock
from train.sharding import embedding_bytes_per_rank, format_plan
from train.state_digest import state_digest
from train.summary import format_summary, write_summary
from train.system_info import peak_rss_bytes
from train.threads import (
    ThreadChoice,
    apply_threads,
    cgroup_cpu_limit,
    choose_threads,
    chosen_omp_num_threads,
    cpu_report,
    ranks_sharing_cpus,
)


def quiet_library_logs() -> None:
    """TorchRec logs every planner proposal and pipeline drain at INFO; keep warnings only,
    and drop its deprecation chatter about ShardedTensor and its own topology helpers."""
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\..*")
    warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)


def to_config(cfg: DictConfig | Config) -> Config:
    """The typed config; instantiating the dataclasses runs their __post_init__ checks.
    A key no dataclass declares (added with Hydra's ``+``) is a ValueError naming it."""
    if isinstance(cfg, Config):
        return cfg
    reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


class ConfigError(Exception):
    """A config or input that cannot run; its message is one line naming what and where."""


# 128 + SIGTERM, what a process killed by SIGTERM reports: a stopped run is not a success.
STOPPED_EXIT_CODE = 143


class Stopped(Exception):
    """Training stopped on a pre-emption signal after saving a checkpoint."""


def resume_if_asked(config: Config, job, run_dir: Path, say) -> int:
    """Load the checkpoint trainer.resume points at; returns the step to continue from."""
    # The checkpoints folder becomes this run's (a fresh start sets another run's aside).
    try:
        on_rank_zero(start_checkpoints, run_dir, config.trainer.resume)
    except OSError as error:
        raise ConfigError(f"cannot prepare the checkpoints folder of {run_dir}: {error}") from None
    if config.trainer.resume == "none":
        return 0
    try:
        info = choose_checkpoint(config.trainer.resume, run_dir)
        if info is None:
            say("resume=auto: no checkpoint in the run directory yet, starting at step 0")
            return 0
        load_checkpoint(info, job.model, job.optimizer)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if info.step > config.trainer.steps:
        raise ConfigError(
            f"checkpoint {info.path} is at step {info.step}, beyond trainer.steps="
            f"{config.trainer.steps}"
        )
    if info.step == config.trainer.steps:
        # Training ended but the job did not (stopped or killed in its final evaluation or
        # summary): finish it now.
        say(f"resumed from {info.path} at step {info.step}: training is done, finishing the job")
    else:
        say(f"resumed from {info.path} at step {info.step}")
    return info.step


def validated(cfg: DictConfig | Config) -> tuple[Config, list | None]:
    """The typed config and its feature groups (None: derived from the data once the ranks
    are up, see train/parquet_features.py), or ConfigError with one clear line."""
    try:
        config = to_config(cfg)
        if derives_features(config):
            return config, None
        return config, feature_groups(config.features, config.hashing, job_budget_facts(config))
    except ValueError as error:
        raise ConfigError(str(error)) from error


def job_budget_facts(config: Config, world_size: int | None = None) -> BudgetFacts:
    """What a hashing budget needs of the job; the world size: the plan_only target's, else
    the launched one (read from the launcher's environment before any process group)."""
    world_size = config.plan_topology.world_size or world_size or detect_launch().world_size
    return budget_facts(config, world_size)


def say_budget(config: Config, groups, world_size: int, say) -> None:
    """Rank 0 prints what a hashing budget chose (nothing without a budget)."""
    try:
        choice = budget_choice(config.features, config.hashing,
                               job_budget_facts(config, world_size))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if choice is not None:
        say(format_budget(choice, groups, config.optim.embedding))


def data_statistics_and_features(
    config: Config, groups: list | None, run_dir: Path, say
) -> tuple[list, dict | None]:
    """Parquet data's statistics (measured once on rank 0, reused on resume) where the job
    needs them, and the feature groups, derived from the columns when no feature YAML was
    given (config.features is replaced by the derived set). A collective."""
    if not needs_statistics(config):
        return groups, None  # type: ignore[return-value]
    try:
        fill_columns_from_schema(config)
        statistics = data_statistics(config, run_dir)
        if groups is None:
            config.features = derived_features(config, statistics)
            say(describe(statistics, config.features))
            groups = feature_groups(config.features, config.hashing, job_budget_facts(config))
    except (ValueError, OSError) as error:  # bad schema, bad rows, no rows, missing paths
        raise ConfigError(str(error)) from None
    return groups, statistics


def run(
    cfg: DictConfig | Config, run_dir: str | Path, job_files: dict[str, str] | None = None
) -> dict:
    """Train (or only plan) the job described by ``cfg``; returns the summary.
    ``job_files``: the config files to keep in ``run_dir/.hydra`` (name -> text)."""
    config, groups = validated(cfg)
    quiet_library_logs()
    try:
        context = init_distributed(config.trainer.dist_timeout_s)
    except LaunchError as error:  # a venv that does not fit this node, a bad node list
        raise ConfigError(str(error)) from None
    # A rank that fails tells the others, which stop within seconds naming its error.
    failures = watch_rank_failures(context.rank, context.world_size)
    try:
        return _run(config, groups, context, Path(run_dir), job_files or {})
    except (Stopped, KeyboardInterrupt):
        raise  # every rank stops together: nothing to tell the others
    except BaseException as error:
        if failures is None:
            raise
        explained = failures.explain(error)
        if explained is error:
            raise
        raise explained from None
    finally:
        if failures is not None:
            failures.close()
        release_run_lock()
        shutdown_distributed()


def _plan_target(
    config: Config, groups, context: DistributedContext, run_dir: Path, say
) -> dict:
    """plan_only for a target topology: rank 0 plans, prints, and says whether it fits."""
    target = config.plan_topology
    say(
        f"hashrec: planning features={config.features.name} for {target.world_size} x "
        f"{target.compute_device} ranks ({min(target.local_world_size, target.world_size)} per host)"
    )
    say_budget(config, groups, target.world_size, say)
    try:
        plan = plan_for_topology(config, groups)
    except ValueError as error:  # PlanDoesNotFit included
        raise ConfigError(str(error)) from error
    say("sharding plan\n" + format_plan(plan.placed, target.world_size))
    say(plan.caps.describe())
    say("memory per rank\n" + format_memory(plan))
    say("the plan fits")
    summary = {
        "world_size": target.world_size,
        "embedding_bytes_per_rank": embedding_bytes_per_rank(plan.placed, target.world_size),
        "hbm_bytes_per_rank": plan.hbm_bytes_per_rank,
        "host_bytes_per_rank": plan.host_bytes_per_rank,
    }
    _log_plan(config, context, run_dir, plan.placed, summary)
    return summary


def _log_plan(
    config: Config, context: DistributedContext, run_dir: Path, placed, summary: dict
) -> None:
    """A plan_only job's W&B run (job_type plan) and metrics.jsonl: the config, the system,
    the plan table and the summary (rank 0; nothing elsewhere)."""
    start_run_logging(config, context, run_dir, placed).finish(summary)


@dataclass
class JobData:
    """The job's data: its source, this rank's batch streams, and the planted data's
    Bayes-optimal eval AUC (None for real data)."""

    source: DataSource
    feed: DataFeed
    eval_bayes_auc: float | None


def _run(
    config: Config, groups, context: DistributedContext, run_dir: Path, job_files: dict[str, str]
) -> dict:
    """The phases of a job, top-down: build, data, logging, resume, train, summary, report."""
    say = _printer(context)
    threads = set_threads(config, context)
    groups, statistics = data_statistics_and_features(config, groups, run_dir, say)
    if config.plan_topology.world_size is not None:
        return _plan_target(config, groups, context, run_dir, say)
    say(
        f"hashrec: world size {context.world_size} ({context.backend}, {context.device.type}), "
        f"features={config.features.name} model={config.model.name} "
        f"sharding={config.sharding.name}, run dir {run_dir}"
    )
    say(threads.describe())
    say_budget(config, groups, context.world_size, say)
    settings = model_settings_line(config)
    if settings is not None:
        say(settings)
    try:  # one job at a time in a run directory, held until run() ends
        on_rank_zero(take_run_lock, run_dir)
    except RunDirInUse as error:
        raise ConfigError(str(error)) from None
    on_rank_zero(save_job_config, run_dir, job_files)
    if statistics is not None:
        on_rank_zero(save_statistics, run_dir, statistics)
    if config.plan_only:
        # Planned on the meta device: no table is materialised (a plan of tables larger than
        # this machine's memory still prints, or says what does not fit).
        placed = _plan_here(config, groups, context, say)
        summary = {
            "world_size": context.world_size,
            "embedding_bytes_per_rank": embedding_bytes_per_rank(placed, context.world_size),
        }
        _log_plan(config, context, run_dir, placed, summary)
        return summary
    job = _build(config, groups, context, say)
    per_rank = embedding_bytes_per_rank(job.placed, context.world_size)
    data = _data(config, groups, context, say, statistics)
    metrics = _start_logging(config, context, run_dir, job, say, threads)
    start_step = resume_if_asked(config, job, run_dir, say)
    # The hooks the loop calls on every rank: checkpoints and pre-emption after every step;
    # the hashing report (and the planted data's Bayes AUC) after every eval.
    checkpoints = CheckpointPolicy(
        run_dir, job.model, job.optimizer, config.checkpoint, config.trainer.steps, say,
        on_saved=metrics.log_checkpoint if config.logger.log_checkpoints else None,
    )
    hashing = HashingReportHook(
        groups, config.optim.embedding, data.feed.eval_batches, job.model
    )
    hooks: list[TrainingHook] = [checkpoints, hashing]
    if data.eval_bayes_auc is not None:
        hooks.append(FixedEvalMetrics({"eval/bayes_auc": data.eval_bayes_auc}))
    # Last: a profiled step's trace starts after the other hooks' work.
    hooks += profiling_hooks(config.trainer, run_dir, context, metrics, say)
    trainer = Trainer(
        TrainingParts(job.model, job.optimizer, WarmupDecaySchedule(job.optimizer, config.optim)),
        context,
        data.feed,
        Reporting(
            log_every=config.logger.log_every,
            print_fn=say,
            metrics=metrics,
            progress_bar=config.logger.progress_bar,
            planned_embedding_bytes=per_rank,
            per_rank_keys_max_world_size=config.logger.per_rank_keys_max_world_size,
        ),
        hooks,
    )
    started = time.perf_counter()
    result = _train(config, trainer, checkpoints, metrics, start_step)
    summary = _summary(config, context, job, data, result, hashing, metrics, per_rank, started)
    _write_report(run_dir, summary, result, metrics, say)
    return summary


def set_threads(config: Config, context: DistributedContext) -> ThreadChoice:
    """Size this rank's thread pools to its share of the CPUs it may use, or as
    trainer.threads or OMP_NUM_THREADS say (train/threads.py). A collective: every rank
    reports its CPUs, to learn which ranks of its host share them."""
    everyone = cpu_report()
    cpus = list(everyone[context.rank][1])
    try:
        choice = choose_threads(
            config.trainer.threads,
            chosen_omp_num_threads(os.environ, context.local_world_size),
            cpus,
            ranks_sharing_cpus(everyone, context.rank),
            cgroup_cpu_limit(),
            physical_cores(cpus),
        )
    except ValueError as error:  # an OMP_NUM_THREADS that is no count
        raise ConfigError(str(error)) from None
    apply_threads(choice)
    return choice


def _printer(context: DistributedContext) -> Callable[[str], None]:
    """print on rank 0, nothing elsewhere."""

    def say(message: str) -> None:
        if context.is_main:
            print(message, flush=True)

    return say


def _build(config: Config, groups, context: DistributedContext, say) -> ShardedJob:
    """Plan, shard and initialise the model and its optimizer; print the plan."""
    try:
        job = build_sharded_job(config, groups, context)
    except ValueError as error:  # sharding choices and model shapes the config asked for
        raise ConfigError(str(error)) from error
    say("sharding plan\n" + format_plan(job.placed, context.world_size))
    say(job.caps.describe())
    return job


def _plan_here(config: Config, groups, context: DistributedContext, say) -> list:
    """plan_only on the launched ranks: the plan of the model on ``meta``, printed."""
    try:
        unsharded = meta_model_with_fused_optimizer(config, groups, context.world_size)
        _, placed, _, caps = plan_for(config, groups, unsharded, context)
    except ValueError as error:  # PlanDoesNotFit included
        raise ConfigError(str(error)) from error
    say("sharding plan\n" + format_plan(placed, context.world_size))
    say(caps.describe())
    return placed


def _data(
    config: Config, groups, context: DistributedContext, say, statistics: dict | None = None
) -> JobData:
    """The data source and this rank's train (prefetched) and eval batch streams."""
    try:
        source, eval_bayes_auc = build_data_source(config, groups, context, statistics)
    except (ValueError, OSError) as error:  # missing paths, malformed rows, wrong columns
        raise ConfigError(str(error)) from error
    rank, world_size = context.rank, context.world_size
    if eval_bayes_auc is not None:
        say(f"planted data: Bayes-optimal eval AUC {eval_bayes_auc:.4f}")

    def train_batches(start: int, stop: int) -> Iterator[Batch]:
        return prefetched(
            source.train_batches(rank, world_size, start, stop), config.data.prefetch_batches,
            pin_memory=pin_batches_for(context.device),
        )

    def eval_batches() -> Iterator[Batch]:
        return source.eval_batches(rank, world_size)

    feed = DataFeed(
        train_batches=train_batches,
        eval_batches=eval_batches,
        batch_size=config.trainer.batch_size,
        num_eval_batches=config.data.eval_batches if config.data.source == "synthetic" else None,
    )
    return JobData(source=source, feed=feed, eval_bayes_auc=eval_bayes_auc)


def _start_logging(
    config: Config,
    context: DistributedContext,
    run_dir: Path,
    job: ShardedJob,
    say,
    threads: ThreadChoice,
) -> MetricsLogger:
    """W&B + metrics.jsonl on rank 0 (no-op elsewhere), then CPU pinning (a collective)."""
    # Config, system facts, plan table.
    metrics = start_run_logging(config, context, run_dir, job.placed)
    # After W&B has started its service process, which would otherwise share rank 0's cores.
    # A collective; GPU ranks get cores near their GPU. A thread count that trainer.threads
    # or OMP_NUM_THREADS set stays; otherwise each rank runs one per core of its share.
    if config.trainer.cpu_affinity == "auto":
        cores = pin_local_rank(
            context.local_rank, context.local_world_size, context.device,
            one_thread_per_core=threads.auto,
        )
        if cores is not None:
            each = "one intra-op thread per core" if threads.auto else threads.reason
            say(f"cpu affinity: each of the {context.local_world_size} ranks on a host "
                f"pinned to {len(cores)} CPU(s) of its own, {each}")
    return metrics


def _train(
    config: Config,
    trainer: Trainer,
    checkpoints: CheckpointPolicy,
    metrics: MetricsLogger,
    start_step: int,
) -> TrainResult:
    """Train to trainer.steps (catching stop signals), save the last checkpoint; a stop or
    bad input ends the W&B run with its exit code and becomes Stopped or ConfigError."""
    try:
        with checkpoints.signals():
            result = trainer.train(config.trainer.steps, config.trainer.eval_every, start_step)
        checkpoints.at_end(result.steps)
    except TrainingStopped as stopped:
        metrics.finish(None, exit_code=STOPPED_EXIT_CODE)
        checkpoints.hand_on_signals()  # in a submitit sweep job: requeue it (rank 0 exits here)
        raise Stopped(
            f"stopped by signal at step {stopped.args[0]}; resume with trainer.resume=auto"
        ) from None
    except (CheckpointError, BadRowError, IdOutOfRangeError) as error:
        # Bad input met during training (a malformed row, an ID a `none` table cannot hold)
        # or a checkpoint that cannot be written: one line, non-zero exit.
        metrics.finish(None, exit_code=1)
        raise ConfigError(str(error)) from None
    except BaseException:
        metrics.finish(None, exit_code=1)
        raise
    return result


def _summary(
    config: Config,
    context: DistributedContext,
    job: ShardedJob,
    data: JobData,
    result: TrainResult,
    hashing: HashingReportHook,
    metrics: MetricsLogger,
    per_rank: list[int],
    started: float,
) -> dict:
    """summary.json's contents, the same on every rank (collectives: every rank calls it)."""
    final_eval = result.evals[-1]
    source = data.source
    return {
        "world_size": context.world_size,
        "precision": "bf16" if dense_autocast(config.trainer.precision) else "fp32",
        "steps": result.steps,
        "samples": result.samples,
        "samples_per_sec": result.samples_per_sec,
        "train_loss": result.train_loss,
        "eval_auc": final_eval.auc,
        "eval_bayes_auc": data.eval_bayes_auc,
        "eval_ne": final_eval.normalized_entropy,
        "eval_log_loss": final_eval.log_loss,
        "evals": [vars(item) for item in result.evals],
        "state_digest": state_digest(job.model, job.optimizer, context.rank),
        "peak_rss_bytes": reduce_over_ranks(peak_rss_bytes(), context.device, "max"),
        "embedding_bytes": sum(per_rank),
        "embedding_bytes_per_rank": per_rank,
        "sharding": {
            table.name: {"type": table.sharding_type, "ranks": table.ranks}
            for table in job.placed
        },
        "skipped_rows": source.skipped_rows
        if source.skipped_rows_are_global
        else reduce_over_ranks(source.skipped_rows, context.device),
        # Per feature: rows, bytes, expected and measured collisions (a collective).
        "hashing": hashing.final(),
        "wandb_dir": metrics.wandb_dir,
        "wall_seconds": time.perf_counter() - started,
    }


def _write_report(
    run_dir: Path, summary: dict, result: TrainResult, metrics: MetricsLogger, say
) -> None:
    """summary.json, the console tables, then W&B's summary and finish."""
    # Rank 0 writes; a failure there (a full disk) reaches every rank as the same error.
    on_rank_zero(write_summary, run_dir, summary)
    say(format_hashing(summary["hashing"]))
    say(format_summary(summary))
    # After summary.json is safe on disk: the hashing table, then W&B's summary and finish.
    metrics.log_hashing(summary["hashing"], result.steps)
    metrics.finish(summary)
