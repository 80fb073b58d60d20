"""Config -> feature specs -> model -> sharding plan -> DistributedModelParallel.

Built in TorchRec's order: tables on the meta device, fused optimizer attached to the
embedding parameters, a collective plan, DMP (which materialises only the local shards),
then a dense optimizer and the two combined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer

from modules.budget import BudgetShare
from modules.embeddings import fill_table_block
from modules.features import FeatureGroupSpec, FeatureSpec
from modules.hashing import check_unique_names, group_tables
from modules.model import ClickModel, ClickModelTrain, embedding_group
from train.config import Config, FeaturesConfig, HashingConfig, spec_values
from train.comms import embedding_sharder
from train.managed_sharding import ManagedCollectionSharder
from train.hashing import FrequencyFile, check_hashing_names, resolve_hashing
from train.hashing.budget import (
    BudgetChoice,
    BudgetFacts,
    DeclaredFeature,
    choose_within_budget,
    has_budget,
)
from train.hashing.resolve import is_pinned
from train.distributed import DistributedContext
from train.memory_caps import MemoryCaps, local_memory_caps
from train.optimizers import (
    check_fused_optimizer_runs,
    combined_optimizer,
    embedding_optimizer,
)
from train.sharding import (
    PlacedTable,
    TableInfo,
    build_planner,
    check_column_wise_splits,
    placed_tables,
    plan_sharding,
    sharding_type_per_table,
    table_infos,
)
from train.tables import local_table_blocks


def feature_groups(
    config: FeaturesConfig,
    hashing: HashingConfig | None = None,
    facts: BudgetFacts | None = None,
) -> list[FeatureGroupSpec]:
    """The feature set as specs: listed groups first, then generated tables.

    ``hashing`` picks each feature's hashing method and may resize its table
    (``hashing.compression_ratio``); None keeps the baseline, modulo into num_embeddings rows.
    With a memory budget (``hashing.budget_bytes``) the features the config does not pin get
    the method and rows the budget chooses, which needs the job's ``facts``.
    """
    frequency_file = FrequencyFile(hashing.frequency_file if hashing is not None else None)
    choice = budget_choice(config, hashing, facts, frequency_file)

    shares = choice.allocation.shares if choice is not None else {}
    specs = [
        (feature, _feature_spec(feature, hashing, frequency_file, shares.get(feature.name)))
        for feature in declared_features(config)
    ]

    def members(group_name: str, generated: bool) -> tuple[FeatureSpec, ...]:
        return tuple(
            s for f, s in specs
            if f.group == group_name and (f.config is config.generated) == generated
        )

    groups = [
        FeatureGroupSpec(name, group.embedding_dim or config.embedding_dim, members(name, False))
        for name, group in config.groups.items()
    ]
    for index in range(config.generated.num_groups if config.generated.num_tables else 0):
        if members(f"g{index}", True):
            groups.append(
                FeatureGroupSpec(f"g{index}", config.embedding_dim, members(f"g{index}", True))
            )
    if not groups:
        raise ValueError(f"features={config.name} declares no feature groups")
    if hashing is not None:
        check_hashing_names(hashing, [f.name for g in groups for f in g.features])
    check_unique_names(groups)
    return groups


def declared_features(config: FeaturesConfig) -> list[DeclaredFeature]:
    """Every feature of the set in canonical order: listed groups, then the generated tables
    t000, t001... dealt over groups g0, g1..."""
    declared = [
        DeclaredFeature(name, group_name, group.embedding_dim or config.embedding_dim, feature,
                        feature.hashing)
        for group_name, group in config.groups.items()
        for name, feature in group.features.items()
    ]
    generated = config.generated
    width = len(str(generated.num_tables - 1))
    by_group = sorted(range(generated.num_tables), key=lambda i: (i % generated.num_groups, i))
    declared += [
        DeclaredFeature(f"t{index:0{width}d}", f"g{index % generated.num_groups}",
                        config.embedding_dim, generated, None)
        for index in by_group
    ]
    return declared


def budget_choice(
    config: FeaturesConfig,
    hashing: HashingConfig | None,
    facts: BudgetFacts | None,
    frequency_file: FrequencyFile | None = None,
) -> BudgetChoice | None:
    """What ``hashing.budget_bytes`` buys for this feature set (None: no budget). The pinned
    features are resolved as without a budget and paid for first."""
    if not has_budget(hashing):
        return None
    assert hashing is not None
    if facts is None:
        raise ValueError(
            "hashing.budget_bytes needs the job's embedding optimizer, world size and data "
            "source, which this tool does not pass: run it without a hashing budget"
        )
    frequency_file = frequency_file or FrequencyFile(hashing.frequency_file)
    declared = declared_features(config)
    pinned = {
        feature.name: _feature_spec(feature, hashing, frequency_file)
        for feature in declared
        if is_pinned(hashing, feature.name, feature.method)
    }
    return choose_within_budget(hashing, facts, declared, pinned, frequency_file)


def _feature_spec(
    feature: DeclaredFeature,
    hashing: HashingConfig | None,
    frequency_file: FrequencyFile,
    share: BudgetShare | None = None,
) -> FeatureSpec:
    """The one conversion of a feature's config (FeatureConfig or GeneratedTablesConfig) to
    its spec, which checks it; ``share``: what a hashing budget chose for it."""
    rows, hashing_spec = resolve_hashing(
        hashing, feature.name, feature.config.id_space, feature.config.num_embeddings,
        feature.method, frequency_file, share, feature.config.ids_per_sample,
    )
    values = spec_values(feature.config, FeatureSpec)
    values.update(name=feature.name, num_embeddings=rows, hashing=hashing_spec)
    return FeatureSpec(**values)


def build_click_model(
    config: Config,
    groups: list[FeatureGroupSpec],
    embedding_device: torch.device,
    num_shards: int = 1,
) -> ClickModelTrain:
    """The unsharded model with its loss; dense weights seeded by trainer.seed.
    ``num_shards``: the world size its managed tables will be sharded over."""
    sparse_groups = {
        group.name: embedding_group(group, embedding_device, num_shards) for group in groups
    }
    # Seed right before the dense layers, so their init does not depend on whether the
    # tables above were built on meta (no RNG use) or materialised.
    torch.manual_seed(config.trainer.seed)
    model = ClickModel(
        groups=groups,
        embedding_groups=sparse_groups,
        num_dense_features=config.features.num_dense_features,
        dense_layer_sizes=list(config.model.dense_layer_sizes),
        over_layer_sizes=list(config.model.over_layer_sizes),
        interaction=config.model.interaction,
        dcn_num_layers=config.model.dcn_num_layers,
        dcn_low_rank_dim=config.model.dcn_low_rank_dim,
        dense_autocast=dense_autocast(config.trainer.precision),
    )
    return ClickModelTrain(model)


def dense_autocast(precision: str) -> tuple[str, torch.dtype] | None:
    """trainer.precision -> what ClickModel autocasts its dense side to (None = float32)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "fp32":
        return None
    if precision == "auto":
        if device_type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:  # private but stable helpers; the public get_capabilities() lacks these flags
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        if not native:
            return None
    return device_type, torch.bfloat16


@torch.no_grad()
def init_tables(model: torch.nn.Module, groups: list[FeatureGroupSpec], seed: int) -> None:
    """Give every local table block its sharding-independent initial values."""
    sizes = {t.name: (t.num_embeddings, t.embedding_dim) for g in groups for t in group_tables(g)}
    for block in local_table_blocks(model):
        num_embeddings, embedding_dim = sizes[block.table_name]
        fill_table_block(
            block.tensor,
            seed=seed,
            table_name=block.table_name,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            row_offset=block.row_offset,
            column_offset=block.column_offset,
        )


@dataclass
class ShardedJob:
    """Everything the loop needs from the build."""

    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    plan: ShardingPlan
    placed: list[PlacedTable]
    tables: list[TableInfo]
    caps: MemoryCaps


def plan_for(
    config: Config,
    groups: list[FeatureGroupSpec],
    unsharded: torch.nn.Module,
    context: DistributedContext,
) -> tuple[ShardingPlan, list[PlacedTable], list[TableInfo], MemoryCaps]:
    tables = table_infos(groups)
    # The same rule as plan_only (train/memory_caps.py), read off this rank's own GPU and host.
    caps = local_memory_caps(
        context.device,
        context.local_world_size,
        config.sharding.hbm_cap_bytes,
        config.sharding.ddr_cap_bytes,
    )
    planner = capped_planner(
        config, tables, context.world_size, context.local_world_size, context.device, caps
    )
    plan = plan_sharding(
        unsharded, planner, job_sharders(config), groups, context.device.type, caps
    )
    placed = placed_tables(plan, tables, context.world_size, config.optim.embedding)
    return plan, placed, tables, caps


def capped_planner(
    config: Config,
    tables: list[TableInfo],
    world_size: int,
    local_world_size: int,
    device: torch.device,
    caps: MemoryCaps,
) -> EmbeddingShardingPlanner:
    """The planner of a job (this one, or plan_only's target): the config's sharding types
    per table, checked, over ``world_size`` ranks under the memory ``caps``."""
    return build_planner(
        tables,
        chosen_sharding(config, tables),
        world_size=world_size,
        local_world_size=local_world_size,
        device=device,
        batch_size=config.trainer.batch_size,
        caps=caps,
    )


def job_sharders(config: Config) -> list[ModuleSharder]:
    """The sharders of every plan and of DistributedModelParallel: plain collections, and
    managed ones (TorchRec's MC sharder wraps the same collection sharder; row-wise only)."""
    collection_sharder = embedding_sharder(config.sharding.comms_precision)
    managed_sharder = ManagedCollectionSharder(
        ebc_sharder=collection_sharder,
        qcomm_codecs_registry=collection_sharder.qcomm_codecs_registry,
    )
    return [managed_sharder, collection_sharder]


def embedding_parameters(model: ClickModelTrain) -> list[torch.nn.Parameter]:
    """Every table's weights, in every group's collections (plain and managed)."""
    return [
        p
        for group in model.model.embedding_groups.values()
        for collection in group.collections()
        for p in collection.parameters()
    ]


def meta_model_with_fused_optimizer(
    config: Config, groups: list[FeatureGroupSpec], num_shards: int
) -> ClickModelTrain:
    """The model with its tables on ``meta`` and the fused embedding optimizer attached: what
    the planner sizes (optimizer state included) and DistributedModelParallel shards over
    ``num_shards`` ranks."""
    model = build_click_model(config, groups, torch.device("meta"), num_shards)
    optimizer_class, optimizer_kwargs = embedding_optimizer(config.optim)
    apply_optimizer_in_backward(optimizer_class, embedding_parameters(model), optimizer_kwargs)
    return model


def chosen_sharding(config: Config, tables: list[TableInfo]) -> dict[str, str | None]:
    """Each table's forced sharding type (None = the planner's choice), checked."""
    chosen = sharding_type_per_table(
        tables,
        config.sharding.preset,
        dict(config.sharding.tables),
        config.sharding.mixed_row_threshold,
    )
    check_column_wise_splits(tables, chosen)
    return chosen


def build_sharded_job(
    config: Config, groups: list[FeatureGroupSpec], context: DistributedContext
) -> ShardedJob:
    unsharded = meta_model_with_fused_optimizer(config, groups, context.world_size)
    plan, placed, tables, caps = plan_for(config, groups, unsharded, context)
    check_fused_optimizer_runs(config.optim.embedding, placed, context.device)
    model = DistributedModelParallel(
        module=unsharded, device=context.device, plan=plan, sharders=job_sharders(config)
    )
    init_tables(model, groups, config.trainer.seed)
    optimizer = combined_optimizer(model, config.optim)
    return ShardedJob(
        model=model, optimizer=optimizer, plan=plan, placed=placed, tables=tables, caps=caps
    )
