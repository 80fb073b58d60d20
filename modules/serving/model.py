"""The serving model: raw IDs and dense features in, click probabilities out, as TorchScript.

    dense [B, N] ─► bottom MLP ──────────────────────────────────────┐
    values, lengths ─► ServingIdMapping ─► quantized EBC ─► combine ─┴► interaction
        ─► top MLP ─► sigmoid ─► [B]

Built from a trained, unsharded ``ClickModel`` (``modules/model.py``), then made TorchScript
the way TorchRec's own inference path does it: ``torchrec.fx.symbolic_trace`` then
``torch.jit.script``. Tables live in one TorchRec *quantized* EmbeddingBagCollection
(``torchrec.quant``) in fp32, fp16 or int8 (row-wise, with a scale and bias per row); managed
tables join it as plain tables, their maps living in the ID mapping. Everything a server needs
is inside the scripted file: no hashrec code runs when it is loaded (``docs/serving.md``).
"""

from typing import List

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import QuantConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from modules.hash_combine import PooledCombiner
from modules.serving.mapping import ServingIdMapping

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.qint8}


class PlainDotInteraction(nn.Module):
    """DLRM's dot interaction in plain ops (the training one is an autograd Function, which
    TorchScript cannot hold): [dense, dots of every pair of [dense, sparse...]].

    Input: dense [B, D], sparse F x [B, D]. Output [B, D + F(F + 1)/2].
    """

    def __init__(self, pair_indices: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pair_indices", pair_indices.clone())

    def forward(self, dense: torch.Tensor, sparse: List[torch.Tensor]) -> torch.Tensor:
        combined = torch.stack([dense, *sparse], dim=1)  # [B, F + 1, D]
        products = torch.bmm(combined, combined.transpose(1, 2))
        pairs = products.flatten(1).index_select(1, self.pair_indices)
        return torch.cat([dense, pairs], dim=1)


class ServingModel(nn.Module):
    """forward(dense float32 [B, N], values int64 [sum lengths], lengths int32 [F * B]) ->
    click probabilities float32 [B].

    ``values``/``lengths`` are one KJT's worth of raw IDs for the F features in schema order,
    key-major: the lengths of feature 0 for the B samples, then feature 1's, ...; an empty bag
    (length 0) is a missing value. A model trained without dense features
    (``constant_dense``) takes dense [B, 0] and feeds its bottom MLP a constant 1 per sample,
    as training does (``modules/model.py``).
    """

    def __init__(
        self,
        mapping: ServingIdMapping,
        lookup: nn.Module,
        output_keys: list[str],
        combiner: PooledCombiner,
        dense_arch: nn.Module,
        interaction: nn.Module,
        over_arch: nn.Module,
        constant_dense: bool = False,
    ) -> None:
        super().__init__()
        self.constant_dense = constant_dense
        self.mapping = mapping
        self.lookup = lookup
        self.output_keys = output_keys
        self.combiner = combiner
        self.dense_arch = dense_arch
        self.interaction = interaction
        self.over_arch = over_arch

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        rows, row_lengths = self.mapping(values, lengths)
        pooled = self.lookup(
            KeyedJaggedTensor(keys=self.output_keys, values=rows, lengths=row_lengths)
        ).to_dict()
        # Managed features' keys are in the same dict: one collection holds every table.
        sparse = self.combiner(pooled, pooled)
        if self.constant_dense:
            # [B, 0] -> [B, 1] of ones, in tensor ops (traced and scripted as they are).
            dense = torch.ones_like(dense.sum(dim=1, keepdim=True))
        dense_out = self.dense_arch(dense)
        logits = self.over_arch(self.interaction(dense_out, sparse))
        return torch.sigmoid(logits.squeeze(-1))


def quantized_tables(
    configs: list[EmbeddingBagConfig], weights: dict[str, torch.Tensor], precision: str
) -> QuantEmbeddingBagCollection:
    """One TorchRec quantized collection of ``configs`` with the trained ``weights``
    (table name -> float32 [rows, dim]) stored in ``precision`` (fp32 | fp16 | int8)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    tables = [
        EmbeddingBagConfig(
            name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
            feature_names=list(c.feature_names), pooling=PoolingType.SUM,
        )
        for c in configs
    ]
    collection = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    with torch.no_grad():
        for name, bag in collection.embedding_bags.items():
            bag.weight.copy_(weights[name])
    collection.qconfig = QuantConfig(
        activation=torch.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.quantization.PlaceholderObserver.with_args(dtype=PRECISIONS[precision]),
    )
    return QuantEmbeddingBagCollection.from_float(collection)


def table_bytes(lookup: nn.Module) -> int:
    """Bytes of every table as stored (rows padded as fbgemm lays them out, int8 scales and
    biases included)."""
    return sum(b.numel() * b.element_size() for b in lookup.buffers())


def to_torchscript(model: ServingModel) -> torch.jit.ScriptModule:
    """TorchRec's inference path: trace with its fx tracer (which knows KJTs), then script."""
    from torchrec.fx import symbolic_trace

    return torch.jit.script(symbolic_trace(model))
