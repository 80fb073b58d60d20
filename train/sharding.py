"""Sharding: which tables go where, and a readable account of the plan.

TorchRec's stock EmbeddingBagCollectionSharder offers row-wise and table-row-wise sharding
only on CUDA (TorchRec issue #1252: gloo lacked reduce-scatter when that was written). Both
run correctly on CPU with the current gloo (checked: 2 ranks match a single-process run), so
``CpuRowWiseSharder`` adds them back on CPU. That is the only place hashrec extends TorchRec's
sharding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from modules.hashing import group_tables, tables_with_features
from modules.features import FLOAT32_BYTES, FeatureGroupSpec
from train.collectives import on_rank_zero

if TYPE_CHECKING:  # memory_caps imports format_bytes from here
    from train.memory_caps import MemoryCaps

# Optimizer state per table row, in float32 values, as a function of the embedding dim.
OPTIMIZER_STATE_VALUES_PER_ROW = {
    "sgd": lambda dim: 0,
    "rowwise_adagrad": lambda dim: 1,
    "adagrad": lambda dim: dim,
    "adam": lambda dim: 2 * dim,
}


class CpuRowWiseSharder(EmbeddingBagCollectionSharder):
    """The stock sharder, plus row-wise and table-row-wise on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types


@dataclass(frozen=True)
class TableInfo:
    name: str
    group: str
    num_embeddings: int
    embedding_dim: int
    managed: bool = False  # behind MCH modules (hashing managed): row-wise only


def table_infos(groups: list[FeatureGroupSpec]) -> list[TableInfo]:
    """The real tables (a hashed feature may have several: ``f_q``/``f_r``, ``f_weights``;
    a group's shared features have one between them, ``<group>_shared``)."""
    return [
        TableInfo(
            table.name, group.name, table.num_embeddings, table.embedding_dim,
            managed=features[0].hashing.method == "managed",
        )
        for group in groups
        for table, features in tables_with_features(group)
    ]


def sharding_type_per_table(
    tables: list[TableInfo],
    preset: str,
    overrides: dict[str, str],
    mixed_row_threshold: int,
) -> dict[str, str | None]:
    """Table -> the one sharding type it must use, or None to let the planner choose.

    Per-table overrides win over the preset; an override naming no table is an error.
    """
    known = {table.name for table in tables}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"sharding.tables names unknown tables {unknown}; tables are {sorted(known)}"
        )
    chosen: dict[str, str | None] = {}
    for table in tables:
        if table.managed:
            chosen[table.name] = _managed_sharding(table, preset, overrides.get(table.name))
        elif table.name in overrides:
            chosen[table.name] = overrides[table.name]
        elif preset == "auto":
            chosen[table.name] = None
        elif preset == "mixed":
            chosen[table.name] = (
                ShardingType.ROW_WISE.value
                if table.num_embeddings > mixed_row_threshold
                else ShardingType.TABLE_WISE.value
            )
        else:
            chosen[table.name] = preset
    return chosen


def _managed_sharding(table: TableInfo, preset: str, override: str | None) -> str:
    """A managed table's sharding: row-wise, the only type TorchRec's MC sharder offers."""
    asked, where = (override, f"sharding.tables.{table.name}") if override else (preset, "sharding.preset")
    if asked not in ("auto", "mixed", ShardingType.ROW_WISE.value):
        raise ValueError(
            f"table {table.name} uses hashing managed, which TorchRec shards row-wise only; "
            f"{where}={asked} cannot place it (use sharding=auto, mixed or row_wise, or "
            f"+sharding.tables.{table.name}=row_wise)"
        )
    return ShardingType.ROW_WISE.value


def check_column_wise_splits(tables: list[TableInfo], chosen: dict[str, str | None]) -> None:
    """Column-wise shards are at least 4 columns and divide the dim evenly: say so up front
    instead of letting the planner fail with no plan."""
    for table in tables:
        if chosen[table.name] in ("column_wise", "table_column_wise") and (
            table.embedding_dim % 4 != 0
        ):
            raise ValueError(
                f"table {table.name}: column-wise sharding needs an embedding_dim divisible "
                f"by 4, got {table.embedding_dim}"
            )


def build_planner(
    tables: list[TableInfo],
    chosen: dict[str, str | None],
    world_size: int,
    local_world_size: int,
    device: torch.device,
    batch_size: int,
    caps: MemoryCaps,
) -> EmbeddingShardingPlanner:
    """A planner over the topology, constrained to the chosen sharding types, with memory
    caps per rank from train/memory_caps.py (never TorchRec's fixed defaults)."""
    constraints = {
        table.name: ParameterConstraints(
            sharding_types=[chosen[table.name]],
            # On CPU the planner would also offer managed tables fused_uvm, which its
            # estimator then rejects; only fused exists there.
            compute_kernels=["fused"] if table.managed and device.type == "cpu" else None,
        )
        for table in tables
        if chosen[table.name] is not None
    }
    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=device.type,
        hbm_cap=caps.device_bytes,
        ddr_cap=caps.host_bytes,
    )
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False
    )


class PlanDoesNotFit(ValueError):
    """The tables cannot be placed within the ranks' memory; the message says what would help."""


def _largest_tables(groups: list[FeatureGroupSpec], count: int = 3) -> str:
    tables = sorted(
        (
            (t.num_embeddings * t.embedding_dim * FLOAT32_BYTES, t)
            for g in groups
            for t in group_tables(g)
        ),
        key=lambda item: item[0],
        reverse=True,
    )[:count]
    return ", ".join(
        f"{t.name} ({t.num_embeddings:,} rows x {t.embedding_dim} = {format_bytes(size)})"
        for size, t in tables
    )


def plan_or_explain(
    make_plan: Callable[[], ShardingPlan],
    groups: list[FeatureGroupSpec],
    world_size: int,
    compute_device: str,
    caps: MemoryCaps,
) -> ShardingPlan:
    """``make_plan()``, or PlanDoesNotFit naming the caps, the largest tables and the fixes
    instead of TorchRec's multi-line PlannerError."""
    try:
        return make_plan()
    except PlannerError as error:
        text = str(error).strip()
        first_line = (text.splitlines()[0] if text else type(error).__name__).rstrip(". ")
        raise PlanDoesNotFit(
            f"plan does not fit: the tables do not fit on {world_size} x {compute_device} ranks "
            f"({format_bytes(caps.device_bytes)} device, {format_bytes(caps.host_bytes)} host "
            f"memory each): {first_line}. Largest tables: {_largest_tables(groups)}. Hash them "
            f"into fewer rows (hashing config, e.g. a smaller hashing.budget_bytes_per_rank) or "
            f"plan for more ranks (plan_topology.world_size)."
        ) from None


def plan_sharding(
    model: nn.Module,
    planner: EmbeddingShardingPlanner,
    sharders: list[ModuleSharder],
    groups: list[FeatureGroupSpec],
    device_type: str,
    caps: MemoryCaps,
) -> ShardingPlan:
    """Plan on rank 0 and hand the plan, or the reason there is none, to every rank (TorchRec's
    collective_plan would leave the other ranks waiting when rank 0's planner raises)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return on_rank_zero(
        plan_or_explain, lambda: planner.plan(model, sharders), groups, world_size, device_type,
        caps,
    )


@dataclass(frozen=True)
class PlacedTable:
    """One table as the plan places it."""

    name: str
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    num_embeddings: int
    embedding_dim: int
    bytes_per_rank: dict[int, int]


def placed_tables(
    plan: ShardingPlan,
    tables: list[TableInfo],
    world_size: int,
    embedding_optimizer: str,
) -> list[PlacedTable]:
    """Each table's sharding type, ranks and bytes (weights + optimizer state) per rank."""
    by_name = {table.name: table for table in tables}
    state_values = OPTIMIZER_STATE_VALUES_PER_ROW[embedding_optimizer]
    placed = []
    for module_plan in plan.plan.values():
        for table_name, parameter_sharding in module_plan.items():  # type: ignore[union-attr]
            table = by_name[table_name]
            bytes_per_rank: dict[int, int] = {}
            spec = parameter_sharding.sharding_spec
            if spec is None:  # data parallel: a full replica on every rank
                full = table.num_embeddings * (table.embedding_dim + state_values(table.embedding_dim))
                bytes_per_rank = {rank: full * FLOAT32_BYTES for rank in range(world_size)}
            else:
                for shard in spec.shards:  # type: ignore[attr-defined]
                    rows, cols = shard.shard_sizes
                    rank = shard.placement.rank()
                    shard_bytes = rows * (cols + state_values(cols)) * FLOAT32_BYTES
                    bytes_per_rank[rank] = bytes_per_rank.get(rank, 0) + shard_bytes
            placed.append(
                PlacedTable(
                    name=table_name,
                    sharding_type=parameter_sharding.sharding_type,
                    compute_kernel=parameter_sharding.compute_kernel,
                    ranks=sorted(bytes_per_rank),
                    num_embeddings=table.num_embeddings,
                    embedding_dim=table.embedding_dim,
                    bytes_per_rank=bytes_per_rank,
                )
            )
    order = {table.name: index for index, table in enumerate(tables)}
    return sorted(placed, key=lambda item: order[item.name])


def embedding_bytes_per_rank(placed: list[PlacedTable], world_size: int) -> list[int]:
    totals = [0] * world_size
    for table in placed:
        for rank, num_bytes in table.bytes_per_rank.items():
            totals[rank] += num_bytes
    return totals


def format_bytes(num_bytes: float) -> str:
    """Bytes in binary units, e.g. 1.5 GiB (the plan's and the hashing report's)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} PiB"


def format_plan(placed: list[PlacedTable], world_size: int, max_rows: int = 40) -> str:
    """The plan as a table: one line per table, then the total per rank."""
    header = f"{'table':<24} {'sharding':<16} {'ranks':<12} {'rows':>12} {'dim':>5}  bytes per rank"
    lines = [header, "-" * len(header)]
    for table in placed[:max_rows]:
        ranks = ",".join(str(rank) for rank in table.ranks)
        if len(ranks) > 12:
            ranks = f"{table.ranks[0]}..{table.ranks[-1]}"
        per_rank = " ".join(
            f"{rank}:{format_bytes(num_bytes)}" for rank, num_bytes in sorted(table.bytes_per_rank.items())
        )
        if len(table.bytes_per_rank) > 4:
            values = list(table.bytes_per_rank.values())
            per_rank = f"{format_bytes(min(values))}..{format_bytes(max(values))} each"
        lines.append(
            f"{table.name:<24} {table.sharding_type:<16} {ranks:<12} "
            f"{table.num_embeddings:>12,} {table.embedding_dim:>5}  {per_rank}"
        )
    if len(placed) > max_rows:
        lines.append(f"... and {len(placed) - max_rows} more tables")
    totals = embedding_bytes_per_rank(placed, world_size)
    if world_size <= 8:
        per_rank = " ".join(f"{rank}:{format_bytes(b)}" for rank, b in enumerate(totals))
    else:
        per_rank = f"{format_bytes(min(totals))} to {format_bytes(max(totals))} over {world_size} ranks"
    lines.append("total per rank: " + per_rank)
    return "\n".join(lines)
