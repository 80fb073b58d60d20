"""Raw IDs -> table rows. The one place where raw IDs meet table sizes.

Batches carry raw int64 IDs (any value). Before the embedding lookup, each feature's IDs
are mapped onto its table's rows. This module is part of the model (the same mapping must
run at serving time) and runs as a KJT -> KJT step in front of each EmbeddingBagCollection;
TrainPipelineSparseDist pipelines it as a "postproc" module when built with
``pipeline_postproc=True``, so input distribution still overlaps compute.

Plain modulo is the baseline; the hashing methods replace it here.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class ModuloIdMapper(nn.Module):
    """Row = raw ID mod num_embeddings, per feature (non-negative for negative IDs too).

    Args:
        num_embeddings_per_feature: feature name -> rows of its table, in the KJT's key order.

    Example::

        mapper = ModuloIdMapper({"user_id": 1000})
        rows = mapper(KeyedJaggedTensor(["user_id"], torch.tensor([12345, -7]),
                                        lengths=torch.tensor([1, 1])))
        # rows.values() == tensor([345, 993])
    """

    def __init__(self, num_embeddings_per_feature: dict[str, int]) -> None:
        super().__init__()
        self.feature_names = list(num_embeddings_per_feature)
        # A buffer so it follows the model to its device.
        self.register_buffer(
            "num_embeddings",
            torch.tensor(list(num_embeddings_per_feature.values()), dtype=torch.int64),
            persistent=False,
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Args: KJT of raw IDs [sum of lengths]. Returns: KJT of rows, same keys and lengths."""
        # length_per_key() is computed on the host from lengths: per-value divisors without a
        # Python loop over features.
        divisors = torch.repeat_interleave(
            self.num_embeddings,
            torch.tensor(features.length_per_key(), device=self.num_embeddings.device),
            output_size=features.values().numel(),
        )
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=torch.remainder(features.values(), divisors),
            lengths=features.lengths(),
            offsets=features.offsets(),
            stride=features.stride(),
            length_per_key=features.length_per_key(),
            offset_per_key=features.offset_per_key(),
        )
