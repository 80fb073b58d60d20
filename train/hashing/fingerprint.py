"""Each feature's ID mapping as a fingerprint, so a checkpoint is never read through another.

Two hashings can give tables of the same shapes (``hash`` and ``modulo`` of a feature both use
its rows), so the shape check on resume cannot tell them apart; every row would then be read
for other IDs than it was trained on. A feature's fingerprint covers what its
``HashingIdMapper`` computes with: its mapped keys and each key's parameter column (whether it
hashes, salt, moduli, divisor, offset, accepted ID range), which differ between methods,
seeds and sizes.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from modules.id_mapping import HashingIdMapper


def hashing_fingerprints(model: nn.Module) -> dict[str, str]:
    """Feature name -> a short hex digest of how its raw IDs become rows."""
    parts: dict[str, list] = {}
    for mapper in model.modules():
        if not isinstance(mapper, HashingIdMapper):
            continue
        # A small int64 buffer read to the host: a device sync, only at save and resume.
        columns = mapper.key_parameters.detach().cpu().t().tolist()
        for key, source, column in zip(mapper.output_keys, mapper.source_index, columns):
            parts.setdefault(mapper.input_keys[source], []).append([key, column])
    return {
        feature: hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]
        for feature, keys in sorted(parts.items())
    }


def first_difference(saved: dict[str, str], current: dict[str, str]) -> str | None:
    """The first feature (by name) whose mapping differs between the two, or None."""
    for feature in sorted(set(saved) | set(current)):
        if saved.get(feature) != current.get(feature):
            return feature
    return None
