"""The batch that flows through TorchRec's train pipeline, and how its KJTs are built."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


def host_kjt(
    keys: list[str],
    values: torch.Tensor,
    lengths: torch.Tensor,
    length_per_key: list[int],
    stride: int,
) -> KeyedJaggedTensor:
    """A KJT built on the host with its per-key sizes already known.

    ``KeyedJaggedTensor.length_per_key()`` / ``offset_per_key()`` compute from the lengths with
    ``.tolist()`` when the KJT was built without them: on a GPU that is a host-device sync in
    every step (the ID mappers and TorchRec's input dist ask for them). Batches are made on
    the host, where the sizes cost nothing; ``KeyedJaggedTensor.to`` and ``pin_memory`` carry
    them over to the device copy.

    Args:
        values: int64 [sum(length_per_key)], key after key.
        lengths: int32 [len(keys) * stride], key after key.
        length_per_key: IDs per key, [len(keys)].
        stride: samples per key (B).
    """
    offset_per_key = [0]
    for length in length_per_key:
        offset_per_key.append(offset_per_key[-1] + length)
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        stride=stride,
        length_per_key=length_per_key,
        offset_per_key=offset_per_key,
    )


@dataclass
class Batch(Pipelineable):
    """One batch of B samples: dense features, one KJT per feature group, labels.

    One KeyedJaggedTensor per group (rather than one KJT split inside the model) lets
    TrainPipelineSparseDist pipeline every group's EmbeddingBagCollection: splitting a KJT in
    the model counts as an input modification and switches pipelining off.

    Attributes:
        dense_features: float32 [B, num_dense].
        sparse_features: group name -> KJT of raw int64 IDs, keys = the group's features.
        labels: float32 [B], 1.0 = click.
    """

    dense_features: torch.Tensor
    sparse_features: dict[str, KeyedJaggedTensor]
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features={
                name: kjt.to(device=device, non_blocking=non_blocking)
                for name, kjt in self.sparse_features.items()
            },
            labels=self.labels.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        for kjt in self.sparse_features.values():
            kjt.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features={
                name: kjt.pin_memory() for name, kjt in self.sparse_features.items()
            },
            labels=self.labels.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]
