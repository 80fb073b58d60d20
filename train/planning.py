"""Plan a job for a cluster you do not have: TorchRec's planner over a target topology.

``python -m train plan_only=true plan_topology.world_size=64`` runs the planner for 64 ranks of
80 GiB GPUs, 8 per host with 2 TiB of host memory each (by default), on one CPU machine,
prints where every table goes and each rank's device (HBM) and host (DDR) memory, and says whether it fits. A plan that cannot fit exits
non-zero, naming the largest tables and what would make them fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.features import FeatureGroupSpec
from train.build import capped_planner, job_sharders, meta_model_with_fused_optimizer
from train.config import Config
from train.memory_caps import MemoryCaps, memory_caps
from train.sharding import (
    PlacedTable,
    format_bytes,
    placed_tables,
    plan_or_explain,
    table_infos,
)


@dataclass
class TargetPlan:
    placed: list[PlacedTable]
    hbm_bytes_per_rank: list[int]
    host_bytes_per_rank: list[int]
    caps: MemoryCaps
    world_size: int
    compute_device: str


def plan_for_topology(config: Config, groups: list[FeatureGroupSpec]) -> TargetPlan:
    """Plan on this machine for ``config.plan_topology`` (no process group needed)."""
    target = config.plan_topology
    model = meta_model_with_fused_optimizer(config, groups, target.world_size)
    tables = table_infos(groups)
    local_world_size = min(target.local_world_size, target.world_size)
    # The same rule as a real job (train/memory_caps.py), on the memory the target declares.
    caps = memory_caps(
        target.compute_device,
        target.device_memory_bytes,
        target.host_memory_bytes,
        local_world_size,
        config.sharding.hbm_cap_bytes,
        config.sharding.ddr_cap_bytes,
    )
    planner = capped_planner(
        config, tables, target.world_size, local_world_size,
        torch.device(target.compute_device), caps,
    )
    plan = plan_or_explain(
        lambda: planner.plan(model, job_sharders(config)), groups, target.world_size,
        target.compute_device, caps,
    )
    hbm = [0] * target.world_size
    host = [0] * target.world_size
    # The planner's storage estimate per shard (weights, optimizer state, I/O buffers) is only
    # kept on its chosen proposal; TorchRec has no public accessor for it.
    for option in planner._best_plan or []:  # noqa: SLF001
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                hbm[shard.rank] += shard.storage.hbm
                host[shard.rank] += shard.storage.ddr
    return TargetPlan(
        placed=placed_tables(plan, tables, target.world_size, config.optim.embedding),
        hbm_bytes_per_rank=hbm,
        host_bytes_per_rank=host,
        caps=caps,
        world_size=target.world_size,
        compute_device=target.compute_device,
    )


def format_memory(plan: TargetPlan) -> str:
    """Per-rank device and host memory against the caps (all ranks up to 16, else a digest)."""
    lines = [f"{'rank':>6} {'device (HBM)':>14} {'of':>10} {'host (DDR)':>14} {'of':>10}"]
    ranks = list(range(plan.world_size))
    shown = ranks if plan.world_size <= 16 else ranks[:4] + ranks[-4:]
    for rank in shown:
        if plan.world_size > 16 and rank == ranks[-4]:
            lines.append(f"{'...':>6}")
        lines.append(
            f"{rank:>6} {format_bytes(plan.hbm_bytes_per_rank[rank]):>14} "
            f"{format_bytes(plan.caps.device_bytes):>10} "
            f"{format_bytes(plan.host_bytes_per_rank[rank]):>14} "
            f"{format_bytes(plan.caps.host_bytes):>10}"
        )
    total_weights = sum(sum(t.bytes_per_rank.values()) for t in plan.placed)
    lines.append(
        f"max per rank: device {format_bytes(max(plan.hbm_bytes_per_rank))}, host "
        f"{format_bytes(max(plan.host_bytes_per_rank))}; tables (weights + optimizer state) "
        f"{format_bytes(total_weights)} in all ({total_weights / 1e9:.1f} GB)"
    )
    return "\n".join(lines)
