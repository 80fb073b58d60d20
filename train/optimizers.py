"""Optimizers: fused embedding optimizers applied in backward, a dense torch optimizer, and
the learning-rate schedule of the TorchRec DLRM example."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec import optim as trec_optim
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from train.config import OptimConfig
from train.tables import table_name_of

_EMBEDDING_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": torch.optim.Adam,
}
_DENSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}


def embedding_optimizer(config: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class and arguments TorchRec turns into a fused fbgemm optimizer."""
    kwargs: dict[str, Any] = {"lr": config.embedding_lr}
    if config.embedding != "sgd":
        kwargs["eps"] = config.eps
    return _EMBEDDING_OPTIMIZERS[config.embedding], kwargs


# The fused kernels fbgemm's CPU build has (fbgemm-gpu-cpu 1.8: exact SGD, exact Adagrad and
# exact row-wise Adagrad); it fails with an assertion deep inside DMP for any other.
CPU_FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


def check_fused_optimizer_runs(embedding: str, placed: list, device: torch.device) -> None:
    """ValueError naming optim.embedding when a table the plan gives a fused kernel (every
    table but data-parallel ones, which take the torch optimizer) would need one that this
    device's fbgemm lacks: fused Adam on CPU."""
    if device.type != "cpu" or embedding in CPU_FUSED_OPTIMIZERS:
        return
    fused = [table.name for table in placed if table.compute_kernel != "dense"]
    if fused:
        more = f" and {len(fused) - 3} more" if len(fused) > 3 else ""
        raise ValueError(
            f"optim.embedding={embedding} has no fused kernel in fbgemm's CPU build (it has "
            f"{', '.join(CPU_FUSED_OPTIMIZERS)}), which tables {', '.join(fused[:3])}{more} "
            f"would use: pick optim.embedding=rowwise_adagrad, sharding=data_parallel "
            f"(replicated tables take torch's {embedding}), or GPUs"
        )


def dense_optimizers(model: nn.Module, config: OptimConfig) -> list[tuple[str, KeyedOptimizerWrapper]]:
    """Torch optimizers for every parameter without a fused optimizer.

    Data-parallel tables are plain replicated parameters after DMP (no fused kernel), so
    they would silently fall to the dense optimizer and its lr; they get the embedding
    optimizer and lr instead, as every other table does.
    """
    unfused = dict(in_backward_optimizer_filter(model.named_parameters()))
    tables = {name: p for name, p in unfused.items() if table_name_of(name) is not None}
    dense = {name: p for name, p in unfused.items() if name not in tables}
    optimizers = []
    if dense:
        dense_class = _DENSE_OPTIMIZERS[config.dense]
        dense_kwargs: dict[str, Any] = {"lr": config.dense_lr}
        if config.dense != "sgd":
            dense_kwargs["eps"] = config.eps
        optimizers.append(
            ("dense", KeyedOptimizerWrapper(dense, lambda ps: dense_class(ps, **dense_kwargs)))
        )
    if tables:
        table_class, table_kwargs = embedding_optimizer(config)
        optimizers.append(
            (
                "replicated_tables",
                KeyedOptimizerWrapper(tables, lambda ps: table_class(ps, **table_kwargs)),
            )
        )
    return optimizers


def combined_optimizer(model: Any, config: OptimConfig) -> CombinedOptimizer:
    """The fused embedding optimizer and the torch optimizers as one optimizer."""
    return CombinedOptimizer(
        [("embedding", model.fused_optimizer), *dense_optimizers(model, config)]
    )


# The DLRM reference's floor under a decaying learning rate (never raises a smaller base lr).
MIN_DECAY_LR = 1e-7


def lr_scale(step: int, warmup_steps: int, decay_start_step: int, decay_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear warm-up from 0 over ``warmup_steps``; constant until ``decay_start_step``; then
    polynomial (power 2) decay over ``decay_steps`` (0 = no decay), after which the last decayed
    value, (1 / decay_steps)^2, stays for the rest of training. As in the DLRM reference's
    LRPolicyScheduler (facebookresearch/dlrm torchrec_dlrm/lr_scheduler.py), which "freezes
    at last" once the decay ends. One difference: between warm-up and decay the reference also
    freezes at its last warm-up value, (1 - 1/warmup_steps), a quirk; here that stretch is 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps <= 0 or step < decay_start_step:
        return 1.0
    decayed = min(step - decay_start_step, decay_steps - 1)
    return ((decay_steps - decayed) / decay_steps) ** 2


def scheduled_lr(base_lr: float, step: int, config: OptimConfig) -> float:
    """base_lr * lr_scale(step), floored at MIN_DECAY_LR once the decay has begun."""
    scale = lr_scale(step, config.warmup_steps, config.decay_start_step, config.decay_steps)
    if config.decay_steps > 0 and step >= config.decay_start_step:
        return max(min(MIN_DECAY_LR, base_lr), base_lr * scale)
    return base_lr * scale


class WarmupDecaySchedule:
    """Sets every param group's lr to scheduled_lr(base_lr, step); the fused embedding optimizer
    reads its group's lr at the next zero_grad()/step()."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimConfig) -> None:
        self.optimizer = optimizer
        self.config = config
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def set_step(self, step: int) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = scheduled_lr(base_lr, step, self.config)

    def current_lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
