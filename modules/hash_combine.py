"""After the pooled lookup: combine each feature's pooled pieces into one vector.

The EmbeddingBagCollection pools every mapped key on its own (sum over the bag); this module
turns those per-key vectors back into one vector per feature, in the group's feature order:

* one key (none / modulo / hash / frequency / shared): the pooled vector as it is;
* multi_hash: sum or concat of the k probes, each probe scaled by 1 + its learned importance
  weight when the feature has an importance table;
* qr: quotient and remainder vectors multiplied, summed or concatenated (after pooling, as
  the DLRM reference implementation does);
* managed: as one key, read from the managed collection's output.

It holds no parameters (importance weights live in an ordinary table of the collection) and
is deliberately not an ``nn.Module``: TorchRec's pipeline tracer treats a module child of a
module holding a sharded collection as an opaque leaf (whose list output it cannot unpack),
while a plain callable is traced through as ordinary code after the sharded lookup.
"""

from __future__ import annotations

import torch

from modules.features import FeatureSpec
from modules.hashing import feature_keys


class PooledCombiner:
    """feature key -> pooled [B, D] dict in, one [B, D_f] per feature (feature order) out.

    D_f = D, except concat: k D (multi_hash) or 2 D (qr).
    """

    def __init__(self, features: list[FeatureSpec]) -> None:
        self.plans: list[tuple[str, list[str], str, int]] = []
        self.managed = {f.name for f in features if f.hashing.method == "managed"}
        for feature in features:
            spec = feature.hashing
            keys = feature_keys(feature)
            if spec.method == "multi_hash":
                weighted = spec.importance_rows > 0
                how = ("weighted_" if weighted else "") + spec.combine_or_default
                self.plans.append((feature.name, keys, how, spec.num_hashes))
            elif spec.method == "qr":
                self.plans.append((feature.name, keys, "qr_" + spec.combine_or_default, 2))
            else:
                self.plans.append((feature.name, keys, "single", 1))

    def __call__(
        self,
        pooled: dict[str, torch.Tensor] | None,
        managed: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """``pooled``: the plain collection's output by key; ``managed``: the managed one's."""
        outputs = []
        for name, keys, how, num_pieces in self.plans:
            if name in self.managed:
                outputs.append(managed[keys[0]])  # type: ignore[index]
                continue
            assert pooled is not None
            if how == "single":
                outputs.append(pooled[keys[0]])
                continue
            pieces = [pooled[key] for key in keys[:num_pieces]]
            if how.startswith("weighted_"):
                # [B, k]: the ID's importance weights (the table's padding columns unused).
                weights = pooled[keys[num_pieces]][:, :num_pieces]
                pieces = [piece * (1.0 + weights[:, i : i + 1]) for i, piece in enumerate(pieces)]
                how = how[len("weighted_") :]
            if how in ("sum", "qr_sum"):
                outputs.append(torch.stack(pieces).sum(0))
            elif how in ("concat", "qr_concat"):
                outputs.append(torch.cat(pieces, dim=1))
            elif how == "qr_mult":
                outputs.append(pieces[0] * pieces[1])
            else:
                raise ValueError(f"unknown combination {how!r}")
        return outputs
