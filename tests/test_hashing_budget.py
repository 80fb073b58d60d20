"""hashing.budget_bytes: a memory budget in, per-feature method and rows out (modules/budget.py,
train/hashing/budget.py): the bytes the hashing report counts fit the budget to within one
row, pinned features keep their settings, rows follow traffic across features, and a budget
that cannot work fails in one line before training."""

from __future__ import annotations

import json

import pytest
import torch

from modules.budget import (
    BudgetedFeature,
    ListedTraffic,
    UniformTraffic,
    ZipfTraffic,
    allocate,
    parse_bytes,
)
from modules.synthetic import zipf_ranks
from tests.helpers import TINY, compose_config, run_train
from train.build import budget_choice, feature_groups
from train.data import planted_data
from train.export import export as export_run
from train.frequency_counts import count_frequent_ids, save_frequency_file
from train.hashing import hashing_report
from train.hashing.budget import budget_facts
from train.hashing.report import row_bytes
from train.sharding import OPTIMIZER_STATE_VALUES_PER_ROW

# The default feature set at dim 8: 4 features hashed as none (732 rows) are pinned, 5 are
# budgeted (user_interests has 4 IDs per sample).
BUDGETED = ["user_id", "user_interests", "ad_id", "advertiser_id", "site_id"]


@pytest.fixture(scope="module")
def frequency_file(tmp_path_factory):
    """Counts of 30 planted batches of 256 samples, as scripts/count_frequencies.py writes
    them, for all features but site_id (which then falls back to its declared Zipf law)."""
    config = compose_config([*TINY, "trainer.batch_size=256"])
    data = planted_data(config, feature_groups(config.features))
    counted = count_frequent_ids((data.batch("train", 0, step)[0] for step in range(30)), 5000)
    for part in counted.values():
        part.pop("site_id")
    path = tmp_path_factory.mktemp("frequencies") / "counts.pt"
    save_frequency_file(path, counted, {"steps": 30, "ranks": 1, "batch_size": 256})
    return str(path)


def budget_job(overrides: list[str], world_size: int = 1):
    config = compose_config([*TINY, *overrides])
    facts = budget_facts(config, world_size)
    groups = feature_groups(config.features, config.hashing, facts)
    return config, groups, budget_choice(config.features, config.hashing, facts)


def report_bytes(config, groups) -> dict[str, int]:
    report = hashing_report(groups, config.optim.embedding, [])
    return {name: entry["bytes_hashed"] for name, entry in report.items()}


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("budget", [80_000, 123_457, 2_000_000])
@pytest.mark.parametrize("with_file", [True, False])
def test_report_total_fits_the_budget_within_one_row(frequency_file, optimizer, budget,
                                                      with_file):
    overrides = [f"optim={optimizer}", f"hashing.budget_bytes={budget}"]
    if with_file:
        overrides.append(f"hashing.frequency_file={frequency_file}")
    config, groups, choice = budget_job(overrides)
    total = sum(report_bytes(config, groups).values())
    one_row = row_bytes(8, OPTIMIZER_STATE_VALUES_PER_ROW[optimizer])
    assert budget - one_row < total <= budget, (budget, total, one_row)
    assert choice.used_bytes == total
    methods = {f.name: f.hashing.method for g in groups for f in g.features}
    assert {methods[name] for name in BUDGETED} <= {"hash", "frequency"}
    # Own rows only where a file names the IDs: site_id (not in the file) is always hashed.
    assert methods["site_id"] == "hash"
    assert (methods["user_id"] == "frequency") == with_file


def test_budget_per_rank_is_times_the_world_size(frequency_file):
    config, groups, choice = budget_job(
        ["hashing.budget_bytes_per_rank=30000", f"hashing.frequency_file={frequency_file}"],
        world_size=4,
    )
    assert choice.budget_bytes == 120_000
    total = sum(report_bytes(config, groups).values())
    assert 120_000 - 36 < total <= 120_000


def test_explicit_per_feature_settings_win(frequency_file):
    pins = ["+hashing.features.user_id=multi_hash", "+hashing.features.ad_id.num_embeddings=777"]
    config, groups, choice = budget_job(
        ["hashing.budget_bytes=150000", f"hashing.frequency_file={frequency_file}", *pins]
    )
    unbudgeted = compose_config([*TINY, *pins])
    expected = {f.name: f for g in feature_groups(unbudgeted.features, unbudgeted.hashing)
                for f in g.features}
    features = {f.name: f for g in groups for f in g.features}
    for name in ["user_id", "ad_id", "user_country", "ad_category", "hour_of_day", "device_type"]:
        assert features[name] == expected[name], name
    assert features["user_id"].hashing.method == "multi_hash"
    assert (features["ad_id"].num_embeddings, features["ad_id"].hashing.method) == (777, "hash")
    assert set(choice.allocation.shares) == {"user_interests", "advertiser_id", "site_id"}
    sizes = report_bytes(config, groups)
    assert choice.fixed_bytes == {n: sizes[n] for n in sizes if n not in choice.allocation.shares}
    assert 150_000 - 36 < sum(sizes.values()) <= 150_000


def own_and_waiting(shares) -> tuple[float, float]:
    """(the least traffic of an ID with a row of its own, the most of a known ID without),
    over all features."""
    last_own = [s.feature.traffic.listed_traffic(s.own_rows)
                - s.feature.traffic.listed_traffic(s.own_rows - 1)
                for s in shares.values() if s.own_rows > 0]
    waiting = [s.next_own_traffic for s in shares.values()]
    return min(last_own), max(waiting)


def check_hashed_tables_dilute_their_tails(allocation) -> None:
    """Features whose IDs are not known: a row per head ID above the threshold t and at
    most t of the tail's traffic per other row."""
    t = allocation.threshold
    for share in allocation.shares.values():
        if share.feature.traffic.ids is None and not share.full:
            head, head_traffic = share.feature.traffic.head(t)
            tail = share.feature.traffic.tail(t, head, head_traffic)
            assert share.own_rows == 0
            assert tail / (share.hashed_rows - head) <= t, (share.feature.name, share.hashed_rows)


def test_rows_follow_traffic_across_features(frequency_file):
    """One threshold for all: every known ID with a row of its own carries at least the
    traffic of every known ID without one, whichever features they belong to."""
    _, groups, choice = budget_job(
        ["hashing.budget_bytes=100000", f"hashing.frequency_file={frequency_file}"]
    )
    shares = choice.allocation.shares
    assert sum(s.own_rows > 0 for s in shares.values()) >= 3
    least_own, most_waiting = own_and_waiting(shares)
    assert least_own >= most_waiting > 0, (least_own, most_waiting)
    check_hashed_tables_dilute_their_tails(choice.allocation)  # site_id: its Zipf law
    # Rows go where the traffic is, not by ID space: user_interests (4 IDs per sample over
    # 5,000) gets more rows than user_id (1 per sample over 10^9).
    rows = {f.name: f.num_embeddings for g in groups for f in g.features}
    assert rows["user_interests"] > rows["user_id"]


def test_allocation_shares_one_threshold_and_spends_the_budget():
    """The rule on its own: measured, Zipf and uniform traffic side by side."""
    steep = torch.tensor([0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.005])
    flat = torch.full((40,), 0.02)
    features = [
        BudgetedFeature("steep", ListedTraffic(torch.arange(8), steep, 1.0, 1000), 68, 84),
        BudgetedFeature("flat", ListedTraffic(torch.arange(40), flat, 1.0, 100), 132, 148),
        BudgetedFeature("zipf", ZipfTraffic(10**6, 1.2, 2.0), 132, 148),
        BudgetedFeature("uniform", UniformTraffic(5000), 68, 84),
    ]
    for budget in [400, 5_000, 77_777, 400_000]:
        allocation = allocate(features, budget)
        shares = allocation.shares
        assert budget - 132 < allocation.bytes <= budget, (budget, allocation.bytes)
        if any(s.own_rows for s in shares.values()):
            least_own, most_waiting = own_and_waiting(shares)
            assert least_own >= most_waiting, (budget, least_own, most_waiting)
        check_hashed_tables_dilute_their_tails(allocation)
        assert shares["zipf"].own_rows == 0 and shares["uniform"].own_rows == 0
        assert all(s.rows <= s.feature.traffic.id_space for s in shares.values())
        if budget == 5_000:
            # Known IDs below the threshold share one row: a row of theirs would serve no
            # one ID. Zipf's head (2 IDs per sample) takes more rows than uniform's.
            assert (shares["steep"].own_rows, shares["steep"].hashed_rows) == (3, 1)
            assert shares["zipf"].rows > shares["uniform"].rows


def test_zipf_traffic_is_the_planted_law():
    """The declared law's traffic per rank and head mass match draws of the data generator."""
    draws = 2_000_000
    ranks = zipf_ranks(torch.rand(draws, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64), 5000, 1.1)
    counts = torch.bincount(ranks, minlength=5000).double()
    model = ZipfTraffic(5000, 1.1)
    for rank in [0, 1, 2, 10, 100, 1000, 4999]:
        p = model.probability(rank)
        sd = (p * (1 - p) / draws) ** 0.5
        assert abs(counts[rank] / draws - p) < 5 * sd, (rank, float(counts[rank] / draws), p)
    head, mass = model.head(model.probability(50))
    assert head == 51
    assert abs(float(counts[:head].sum()) / draws - mass) < 5 * (mass / draws) ** 0.5


def test_bytes_parse_with_units_and_budget_keys_are_checked():
    assert parse_bytes("k", 86000) == 86000
    assert parse_bytes("k", "86kB") == 86000
    assert parse_bytes("k", "2GiB") == 2 * 1024**3
    for bad in ["2 GB/s", "-5", 0, 1.5, "lots"]:
        with pytest.raises(ValueError, match="is not a positive whole number of bytes"):
            parse_bytes("k", bad)
    assert compose_config(["hashing.budget_bytes=2GiB"]).hashing.budget_bytes == 2 * 1024**3
    with pytest.raises(ValueError, match="are both set: set one"):
        compose_config(["hashing.budget_bytes=1000", "hashing.budget_bytes_per_rank=10"])
    with pytest.raises(ValueError, match="both size the tables: set hashing.compression_ratio="):
        compose_config(["hashing.budget_bytes=1000", "hashing.compression_ratio=16"])


def test_budget_below_the_budgeted_features_minimum_names_what_is_needed():
    # 26,352 bytes of pinned features (732 rows x 36 bytes), then 5 x 36 for one row each.
    with pytest.raises(ValueError, match=r"hashing.budget_bytes=26400: 48 bytes are left after "
                                         r"the 26,352 .* a budget of at least 26,532 bytes"):
        budget_job(["hashing.budget_bytes=26400"])
    assert budget_job(["hashing.budget_bytes=26532"])[2].used_bytes == 26_532


def test_too_small_budget_fails_in_one_line_before_training(tmp_path):
    result = run_train([*TINY, "hashing.budget_bytes=1000"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "hashrec: error: hashing.budget_bytes=1000: the features with pinned hashing alone "
        "take 26,352 bytes (largest: ad_category 18,000, user_country 7,200, hour_of_day 864); "
        "raise the budget or unpin them"
    ], result.stderr[-2000:]
    assert "step" not in result.stdout


def test_a_budgeted_job_prints_its_choice_and_its_report_fits(tmp_path, frequency_file):
    result = run_train(
        [*TINY, "trainer.steps=2", "trainer.eval_every=0", "hashing.budget_bytes_per_rank=60000",
         f"hashing.frequency_file={frequency_file}", "hydra.run.dir=run"],
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "hashing budget hashing.budget_bytes_per_rank=60000 x 1 ranks: 5 features" in out
    assert out.index("hashing budget") < out.index("step ")  # before training
    for name in BUDGETED:
        assert any(line.startswith(f"{name} ") for line in out.splitlines()), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    total = sum(entry["bytes_hashed"] for entry in summary["hashing"].values())
    assert 60_000 - 36 < total <= 60_000
    assert f"used {total:,} B, fixed 26,352 B" in out
    # Export rebuilds the budgeted tables from the run's config and the world size it trained
    # on (the checkpoint's): their shapes must match.
    assert export_run(tmp_path / "run", tmp_path / "model.pt").path.exists()


def test_plan_only_shows_the_choice_for_the_target_cluster(tmp_path):
    result = run_train(
        [*TINY, "plan_only=true", "plan_topology.world_size=4",
         "hashing.budget_bytes_per_rank=20000"],
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "hashing budget hashing.budget_bytes_per_rank=20000 x 4 ranks: 5 features" in out
    assert "budget 80,000 B (78.1 KiB), used " in out
    assert out.index("hashing budget") < out.index("sharding plan")
    user_id = next(line for line in out.splitlines() if line.startswith("user_id "))
    assert user_id.split()[1:3] == ["hash", "zipf"]  # planted data, no file: the declared law
