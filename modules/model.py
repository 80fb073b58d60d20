"""DLRM-style click models over several EmbeddingBagCollections.

Shapes: B = batch size, F = number of features, D = embedding dim, N = dense features.

    dense [B, N] ──► DenseArch ──► [B, D_dense] ─┐
    group KJTs ──► id mapping ──► EBC per group ─┴► interaction (dot | DCNv2) ──► OverArch ──► logit [B]
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from modules.batch import Batch
from modules.embeddings import group_collections, managed_feature_names
from modules.features import FeatureGroupSpec
from modules.hash_combine import PooledCombiner
from modules.hashing import feature_output_dim
from modules.interaction import dot_interaction, pair_indices
from modules.id_mapping import HashingIdMapper

INTERACTIONS = ("dot", "dcn")


class DotInteraction(nn.Module):
    """DLRM's dot interaction: the dense vector plus all pairwise dots of [dense, sparse...].

    Input: dense [B, D], sparse: the F features as 2-D pieces [B, k D] of k consecutive
    features each (one D for all). Output [B, D + F + F(F-1)/2].
    """

    def __init__(self, num_sparse_features: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("pair_indices", pair_indices(num_sparse_features), persistent=False)
        self.output_dim = embedding_dim + num_sparse_features + (
            num_sparse_features * (num_sparse_features - 1) // 2
        )

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        return dot_interaction(dense, sparse, self.pair_indices)


class CrossInteraction(nn.Module):
    """DCNv2 interaction: a low-rank cross network over [dense, sparse...] concatenated.

    Each sparse vector may have its own dim. Input: dense [B, D_dense], sparse: 2-D pieces
    whose concatenation is the features in order ([B, D_f] each, or a group's block).
    Output [B, D_dense + sum D_f].
    """

    def __init__(self, input_dim: int, num_layers: int, low_rank_dim: int) -> None:
        super().__init__()
        self.crossnet = LowRankCrossNet(
            in_features=input_dim, num_layers=num_layers, low_rank=low_rank_dim
        )
        self.output_dim = input_dim

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        return self.crossnet(torch.cat([dense, *sparse], dim=1))


@torch.fx.wrap
def pooled_block(pooled: KeyedTensor, keys: list[str]) -> torch.Tensor:
    """The pooled vectors of ``keys`` side by side, [B, sum of their dims], in that order.

    A collection's output is one [B, sum D] tensor already; a sharded one orders its keys by
    how the planner grouped the tables, not by feature order, and then one permute puts them
    back. Either way this is one tensor, not a split per key and a cat of them again (in
    forward and, through autograd, in backward), which at 258 features cost more than the
    lookups. Wrapped for torch.fx: TorchRec's pipeline tracer records the call as it is
    instead of tracing into the key comparison.
    """
    if pooled.keys() == keys:
        return pooled.values()
    return KeyedTensor.regroup([pooled], [keys])[0]


class EmbeddingGroup(nn.Module):
    """One feature group's sparse side: raw-ID mapping, the group's collections, then combining.

    Keeping each mapper and its collection together as children of one module makes
    TorchRec's pipeline tracer treat the mapper as a leaf it can run as a pipelined postproc.
    A group with managed features (``modules/managed_collisions.py``) holds them in a second,
    managed collection with a mapper of its own; both mappers read the group's KJT.

    Input: KJT of raw IDs for the group's features. Output: the pooled vectors of the group's
    features in feature order, as 2-D pieces whose concatenation along dim 1 is
    [B, sum of D_f] (D_f = D unless a concat combiner widens it): one piece for the whole
    group when every feature is one key read as it is (no multi-key hashing, no managed
    collection), else one [B, D_f] per feature.
    """

    def __init__(
        self,
        feature_names: list[str],
        id_mapper: nn.Module | None,
        embedding_collection: EmbeddingBagCollection | None,
        combiner: PooledCombiner,
        managed_id_mapper: nn.Module | None = None,
        managed_collection: ManagedCollisionEmbeddingBagCollection | None = None,
    ) -> None:
        super().__init__()
        if embedding_collection is None and managed_collection is None:
            raise ValueError(f"feature group {feature_names} has no tables")
        self.feature_names = feature_names
        self.id_mapper = id_mapper
        self.embedding_collection = embedding_collection
        self.managed_id_mapper = managed_id_mapper
        self.managed_collection = managed_collection
        self.combiner = combiner
        # Every feature is its own single key, pooled vector used as it is: the collection's
        # output is the group's block.
        self.one_block = managed_collection is None and all(
            how == "single" and keys == [name] for name, keys, how, _ in combiner.plans
        )

    def collections(self) -> list[nn.Module]:
        """The group's embedding collections (plain, then managed), whichever exist."""
        return [c for c in (self.embedding_collection, self.managed_collection) if c is not None]

    def forward(self, raw_ids: KeyedJaggedTensor) -> list[torch.Tensor]:
        if self.one_block:
            collection = self.embedding_collection(self.id_mapper(raw_ids))
            return [pooled_block(collection, self.feature_names)]
        # A sharded EBC orders its output keys by sharding group, not feature order:
        # the combiner reads by key.
        pooled = managed = None
        if self.embedding_collection is not None:
            pooled = self.embedding_collection(self.id_mapper(raw_ids)).to_dict()
        if self.managed_collection is not None:
            # (pooled KeyedTensor, remapped KJT or None): index, since the pipeline's tracer
            # cannot unpack a traced tuple.
            managed = self.managed_collection(self.managed_id_mapper(raw_ids))[0].to_dict()
        return self.combiner(pooled, managed)


def embedding_group(
    group: FeatureGroupSpec, device: torch.device, num_shards: int
) -> EmbeddingGroup:
    """A feature group's mappers, collections (plain and managed) and combiner.

    ``num_shards``: the world size the group's managed tables will be sharded over.
    """
    plain, managed = group_collections(group, device, num_shards)
    managed_names = managed_feature_names(group)
    plain_names = [name for name in group.feature_names if name not in managed_names]
    features = list(group.features)
    return EmbeddingGroup(
        group.feature_names,
        HashingIdMapper(features, plain_names) if plain is not None else None,
        plain,
        PooledCombiner(features),
        HashingIdMapper(features, managed_names) if managed is not None else None,
        managed,
    )


class ClickModel(nn.Module):
    """DLRM (dot) or DLRM-DCNv2 (dcn) over one EmbeddingBagCollection per feature group.

    Args:
        groups: feature groups, in canonical order.
        embedding_groups: group name -> its EmbeddingGroup (tables unsharded, or on ``meta``
            for DMP); ``embedding_group`` builds one.
        num_dense_features: N (0: no dense input, the bottom MLP sees a constant).
        dense_layer_sizes: bottom MLP; for ``dot`` its last size must equal every group's D.
        over_layer_sizes: top MLP, ending in 1.
        interaction: ``dot`` or ``dcn``.

    Example::

        model = ClickModel(groups, {g.name: embedding_group(g, device, 1) for g in groups},
                           13, [64, 16], [64, 1], "dot")
        logits = model(batch)  # [B]
    """

    def __init__(
        self,
        groups: list[FeatureGroupSpec],
        embedding_groups: dict[str, EmbeddingGroup],
        num_dense_features: int,
        dense_layer_sizes: list[int],
        over_layer_sizes: list[int],
        interaction: str = "dot",
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 512,
        device: torch.device | None = None,
        dense_autocast: tuple[str, torch.dtype] | None = None,
    ) -> None:
        super().__init__()
        # (device type, dtype) to autocast the dense side to (bottom MLP, interaction, top
        # MLP), e.g. ("cpu", torch.bfloat16); None keeps float32. Embedding lookups, their
        # fused optimizer and the loss stay float32 either way.
        self.dense_autocast = dense_autocast
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
        if not over_layer_sizes or over_layer_sizes[-1] != 1:
            raise ValueError(f"over_layer_sizes must end in 1, got {over_layer_sizes}")
        if not dense_layer_sizes:
            raise ValueError("dense_layer_sizes must not be empty")
        self.group_names = [group.name for group in groups]
        self.embedding_groups = nn.ModuleDict(
            {group.name: embedding_groups[group.name] for group in groups}
        )
        # No dense features (many click logs have none): the bottom MLP gets a constant 1 per
        # sample, so its output is a learned vector that the interaction still pairs with
        # every embedding (dot) or crosses (dcn), and both archs keep one shape.
        self.num_dense_features = num_dense_features
        self.dense_arch = DenseArch(max(num_dense_features, 1), dense_layer_sizes, device=device)
        dense_dim = dense_layer_sizes[-1]
        num_features = sum(len(group.features) for group in groups)
        output_dims = {
            f.name: feature_output_dim(f, g.embedding_dim) for g in groups for f in g.features
        }
        if interaction == "dot":
            mismatched = [g.name for g in groups if g.embedding_dim != dense_dim]
            if mismatched:
                raise ValueError(
                    f"dot interaction needs every group's embedding_dim to equal the last "
                    f"dense layer size {dense_dim}; groups {mismatched} differ (use model=dcn "
                    f"for mixed dims)"
                )
            widened = sorted(name for name, dim in output_dims.items() if dim != dense_dim)
            if widened:
                raise ValueError(
                    f"dot interaction needs one dim for every feature; hashing combine=concat "
                    f"widens {widened} beyond {dense_dim} (use model=dcn, or combine sum/mult)"
                )
            self.interaction: nn.Module = DotInteraction(num_features, dense_dim)
        else:
            input_dim = dense_dim + sum(output_dims.values())
            self.interaction = CrossInteraction(input_dim, dcn_num_layers, dcn_low_rank_dim)
        self.over_arch = OverArch(self.interaction.output_dim, over_layer_sizes, device=device)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns float32 logits [B]."""
        sparse: list[torch.Tensor] = []
        for group_name in self.group_names:
            sparse.extend(self.embedding_groups[group_name](batch.sparse_features[group_name]))
        device_type, dtype = self.dense_autocast or ("cpu", torch.float32)
        with torch.autocast(device_type, dtype=dtype, enabled=self.dense_autocast is not None):
            dense_input = batch.dense_features
            if self.num_dense_features == 0:
                dense_input = batch.labels.new_ones((batch.labels.shape[0], 1))
            dense = self.dense_arch(dense_input)
            logits = self.over_arch(self.interaction(dense, sparse))
        return logits.float().squeeze(-1)


class ClickModelTrain(nn.Module):
    """Wraps a ClickModel with the loss, in the (loss, outputs) form TorchRec's pipeline wants.

    forward(batch) -> (loss [], (loss.detach() [], logits [B], labels [B]))
    """

    def __init__(self, model: ClickModel) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
