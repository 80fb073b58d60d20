"""state_digest fingerprints every tensor of the state: float parameters and optimizer
states, and integer ones (frequency maps, managed-collision maps and their counters)."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers import TINY, compose_config
from train.build import build_click_model, feature_groups
from train.frequency_counts import save_frequency_file
from train.state_digest import state_digest

FEATURES = ["user_id", "user_interests", "ad_id", "advertiser_id", "site_id"]


class FloatsAndCounts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.register_buffer("counts", torch.arange(10, dtype=torch.int64))


def test_one_changed_integer_value_changes_the_digest():
    model = FloatsAndCounts()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = state_digest(model, optimizer, rank=0)
    model.counts[7] += 1
    assert state_digest(model, optimizer, rank=0) != before


def test_a_frequency_map_is_fingerprinted(tmp_path):
    path = tmp_path / "frequencies.pt"
    ids = {name: torch.arange(1000) for name in FEATURES}
    save_frequency_file(path, {"ids": ids, "counts": ids}, {})
    config = compose_config([*TINY, "hashing=frequency", f"hashing.frequency_file={path}"])
    model = build_click_model(config, feature_groups(config.features, config.hashing),
                              torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = state_digest(model, optimizer, rank=0)
    rows = next(v for k, v in model.state_dict().items() if "frequent_rows_" in k)
    rows[[0, 1]] = rows[[1, 0]]  # two IDs swap their own rows
    assert state_digest(model, optimizer, rank=0) != before


def test_float_only_state_keeps_its_digest():
    """Integer tensors are new to the digest; the float path (and so the digests recorded
    for float-only jobs, e.g. the default job's) is what it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert state_digest(model, optimizer, rank=0) == "735c4441dc947840"  # computed before integer tensors were included
