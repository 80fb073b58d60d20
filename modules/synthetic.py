"""Synthetic click data with a planted signal, so a run can be judged against the truth.

Every sample is a pure function of (seed, split, rank, step, position): a resumed or
re-sharded run sees exactly the batches it would have seen, and ranks get independent
streams. No table of IDs is stored, whatever the ID space (2^40 users is fine):

* IDs: a popularity rank is drawn from a continuous Zipf-like law over [0, id_space) by
  inverse CDF, then (optionally) scrambled to a 63-bit raw ID by a bijective hash.
* Each raw ID's hidden latent vector and bias are a row of a fixed Gaussian table picked by a
  hash of the ID, so they are the same wherever and whenever the ID appears.
* The planted logit is factorisation-machine shaped: a bias, per-feature ID biases, all
  pairwise dot products of the features' latent vectors, and a linear term of the dense
  features. Labels are Bernoulli(sigmoid(logit)).

The generator also returns the true click probability, so the Bayes-optimal AUC of the very
labels it drew can be reported next to the model's AUC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from modules.batch import Batch
from modules.features import FeatureGroupSpec, FeatureSpec, all_features
from modules.hash_functions import hash64, non_negative, seed_salt, splitmix64, uniform_from_hash

SPLITS = ("train", "eval")
LATENT_SLOTS = 1 << 20


@dataclass(frozen=True)
class PlantedSignal:
    """Strength of each part of the planted logit (all terms are O(1) before weighting)."""

    latent_dim: int = 8
    pair_weight: float = 1.0
    id_bias_weight: float = 1.0
    dense_weight: float = 0.5
    bias: float = -1.0

    def __post_init__(self) -> None:
        if self.latent_dim <= 0:
            raise ValueError(f"planted latent_dim must be > 0, got {self.latent_dim}")


def zipf_ranks(uniforms: torch.Tensor, id_space: int, exponent: float) -> torch.Tensor:
    """Popularity ranks in [0, id_space) from float64 uniforms, by the inverse CDF of the
    continuous density x^-exponent on [1, id_space + 1).

    Args:
        uniforms: float64 [N] in [0, 1).
    Returns:
        int64 [N]; rank 0 is the most popular ID.
    """
    n_plus_1 = float(id_space) + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = torch.exp(uniforms * math.log(n_plus_1))
    else:
        one_minus_s = 1.0 - exponent
        top = n_plus_1**one_minus_s
        x = ((top - 1.0) * uniforms + 1.0) ** (1.0 / one_minus_s)
    ranks = x.floor().to(torch.int64) - 1
    return ranks.clamp_(0, id_space - 1)


def gaussian_from_hash(ids: torch.Tensor, salt: int, num_values: int) -> torch.Tensor:
    """Deterministic standard-normal values per ID (Box-Muller over hashed uniforms).

    Args:
        ids: int64 [N].
    Returns:
        float32 [N, num_values], the same for the same (id, salt) everywhere.
    """
    lanes = torch.arange(2 * num_values, dtype=torch.int64, device=ids.device)
    hashed = hash64(ids.unsqueeze(1) * (2 * num_values) + lanes, salt)  # [N, 2V]
    uniforms = uniform_from_hash(hashed)
    u1 = uniforms[:, 0::2].clamp_min_(1e-7)
    u2 = uniforms[:, 1::2]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


class PlantedClickData:
    """Batches of planted-signal click data, one stream per (split, rank).

    Example::

        data = PlantedClickData(groups, num_dense_features=13, batch_size=512, seed=0)
        batch, click_probability = data.batch("train", rank=0, step=0)
    """

    def __init__(
        self,
        groups: list[FeatureGroupSpec],
        num_dense_features: int,
        batch_size: int,
        seed: int,
        signal: PlantedSignal | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if num_dense_features <= 0:
            raise ValueError(f"num_dense_features must be > 0, got {num_dense_features}")
        self.groups = groups
        self.features: list[FeatureSpec] = all_features(groups)
        self.num_dense_features = num_dense_features
        self.batch_size = batch_size
        self.seed = seed
        self.signal = signal or PlantedSignal()
        generator = torch.Generator().manual_seed(non_negative_seed(seed, "dense-weights"))
        self._dense_weights = torch.randn(num_dense_features, generator=generator) / math.sqrt(
            num_dense_features
        )
        # Each ID's hidden latent vector and bias: row hash(id) of a fixed Gaussian table.
        # One hash and a gather per ID instead of a hash and a Box-Muller transform per value
        # keeps generation far off the training's critical path; distinct IDs share a row only
        # when their hashes collide in 2^20 slots, which the Bayes AUC accounts for anyway.
        table_generator = torch.Generator().manual_seed(non_negative_seed(seed, "latent-table"))
        self._latent_slots = LATENT_SLOTS
        self._latent_table = torch.randn(
            LATENT_SLOTS, self.signal.latent_dim + 1, generator=table_generator
        )
        num_features = len(self.features)
        self._pair_norm = 1.0 / math.sqrt(max(1, num_features * (num_features - 1) // 2))
        self._bias_norm = 1.0 / math.sqrt(num_features)
        self._build_layout()

    def _build_layout(self) -> None:
        """Per-ID constants of a batch, laid out like the batch's values: all features one
        after the other (group order, feature order), each B x ids_per_sample long. A batch
        is then a handful of vectorised ops, whatever the number of features."""
        B = self.batch_size
        counts = [B * f.ids_per_sample for f in self.features]

        def per_id(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype), torch.tensor(counts))

        exponents = [f.zipf_exponent for f in self.features]
        self._id_space = per_id([f.id_space for f in self.features], torch.int64)
        self._log_law = per_id([abs(e - 1.0) < 1e-9 for e in exponents], torch.bool)
        one_minus_s = [1.0 if abs(e - 1.0) < 1e-9 else 1.0 - e for e in exponents]
        self._inverse_power = per_id([1.0 / v for v in one_minus_s], torch.float64)
        self._log_top = per_id([math.log(f.id_space + 1.0) for f in self.features], torch.float64)
        self._top_minus_1 = per_id(
            [(f.id_space + 1.0) ** v - 1.0 for f, v in zip(self.features, one_minus_s)],
            torch.float64,
        )
        self._salt = per_id(
            [seed_salt(self.seed, "feature", f.name) for f in self.features], torch.int64
        )
        self._scramble = per_id([f.scramble_ids for f in self.features], torch.bool)
        # Pooling: ID i belongs to segment (feature, sample); each segment averages its IDs.
        self._segment = torch.cat(
            [
                index * B + torch.arange(B).repeat_interleave(f.ids_per_sample)
                for index, f in enumerate(self.features)
            ]
        )
        self._one_hot = all(f.ids_per_sample == 1 for f in self.features)
        self._ids_per_segment = torch.tensor(
            [float(f.ids_per_sample) for f in self.features]
        ).repeat_interleave(B).unsqueeze(1)
        self._feature_weight = torch.tensor([f.signal_weight for f in self.features]).view(-1, 1, 1)
        # The KJT of a group is a contiguous slice of the values; its lengths never change.
        self._group_slices: list[tuple[FeatureGroupSpec, int, int, torch.Tensor]] = []
        start = 0
        for group in self.groups:
            size = sum(B * f.ids_per_sample for f in group.features)
            lengths = torch.cat(
                [torch.full((B,), f.ids_per_sample, dtype=torch.int32) for f in group.features]
            )
            self._group_slices.append((group, start, start + size, lengths))
            start += size

    def _raw_ids(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Zipf-like popularity ranks (inverse CDF, per-ID law), then optional scrambling."""
        power_law = (self._top_minus_1 * uniforms + 1.0) ** self._inverse_power
        x = torch.where(self._log_law, torch.exp(uniforms * self._log_top), power_law)
        ranks = torch.minimum((x.floor().to(torch.int64) - 1).clamp_(min=0), self._id_space - 1)
        scrambled = non_negative(splitmix64(ranks ^ self._salt))
        return torch.where(self._scramble, scrambled, ranks)

    def batch(self, split: str, rank: int, step: int) -> tuple[Batch, torch.Tensor]:
        """The batch of ``(split, rank, step)`` and its true click probabilities [B]."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        generator = torch.Generator().manual_seed(
            non_negative_seed(self.seed, split, rank, step)
        )
        num_samples = self.batch_size
        num_features = len(self.features)
        latent_dim = self.signal.latent_dim
        uniforms = torch.rand(self._salt.numel(), generator=generator, dtype=torch.float64)
        raw_ids = self._raw_ids(uniforms)
        slots = non_negative(splitmix64(raw_ids ^ self._salt)) & (self._latent_slots - 1)
        values = torch.index_select(self._latent_table, 0, slots)  # [T, d + 1]; faster than [ ]
        if not self._one_hot:  # average each sample's bag
            pooled = torch.zeros(num_features * num_samples, latent_dim + 1)
            values = pooled.index_add_(0, self._segment, values) / self._ids_per_segment
        values = values.view(num_features, num_samples, latent_dim + 1) * self._feature_weight
        latent = values[..., :latent_dim] * (1.0 / math.sqrt(latent_dim))  # [F, B, d]
        # Sum over feature pairs f < g of <z_f, z_g>, without the F^2 loop.
        pair_term = 0.5 * (latent.sum(0).square().sum(1) - latent.square().sum((0, 2)))
        id_bias = values[..., latent_dim].sum(0)
        dense = torch.randn(num_samples, self.num_dense_features, generator=generator)
        logit = (
            self.signal.bias
            + self.signal.pair_weight * self._pair_norm * pair_term
            + self.signal.id_bias_weight * self._bias_norm * id_bias
            + self.signal.dense_weight * (dense @ self._dense_weights)
        )
        click_probability = torch.sigmoid(logit)
        labels = (torch.rand(num_samples, generator=generator) < click_probability).float()
        batch = Batch(
            dense_features=dense,
            sparse_features={
                group.name: KeyedJaggedTensor(
                    keys=group.feature_names, values=raw_ids[start:stop], lengths=lengths
                )
                for group, start, stop, lengths in self._group_slices
            },
            labels=labels,
        )
        return batch, click_probability


def non_negative_seed(*parts: int | str) -> int:
    """A torch.Generator seed (non-negative int64) from a tuple of ints and strings."""
    return seed_salt(*parts) & ((1 << 63) - 1)
