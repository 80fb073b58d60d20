"""The planner's memory caps: one rule for a real job and for plan_only, never TorchRec's
fixed 32 GiB / 128 GiB defaults."""

from __future__ import annotations

import pytest

from tests.helpers import compose_config, run_train
from train.build import feature_groups
from train.memory_caps import host_memory_bytes, memory_caps, parse_cgroup_limit
from train.planning import plan_for_topology

GIB = 1024**3
MLPERF = ["features=criteo_mlperf", "model=dcn", "trainer.batch_size=16384",
          "logger.mode=disabled"]


def test_cuda_rank_gets_its_gpu_and_a_share_of_the_host():
    caps = memory_caps("cuda", 24 * GIB, 512 * GIB, local_world_size=8)
    assert (caps.device_bytes, caps.host_bytes) == (24 * GIB, 64 * GIB)
    assert "512.0 GiB / 8 local ranks" in caps.describe()


def test_cpu_rank_has_no_device_memory_and_shares_the_host():
    caps = memory_caps("cpu", None, 24 * GIB, local_world_size=2)
    assert (caps.device_bytes, caps.host_bytes) == (0, 12 * GIB)


def test_config_caps_win_over_the_hardware():
    caps = memory_caps("cuda", 80 * GIB, 2048 * GIB, 8, hbm_cap_bytes=10 * GIB,
                       ddr_cap_bytes=3 * GIB)
    assert (caps.device_bytes, caps.host_bytes) == (10 * GIB, 3 * GIB)
    assert "sharding.hbm_cap_bytes" in caps.describe()
    assert "sharding.ddr_cap_bytes" in caps.describe()


def test_cuda_without_a_device_size_is_refused():
    with pytest.raises(ValueError, match="GPU's memory"):
        memory_caps("cuda", None, 64 * GIB, 1)


@pytest.mark.parametrize(
    "text, expected",
    [("max\n", None), ("17179869184\n", 16 * GIB), ("9223372036854771712", None), ("", None)],
)
def test_cgroup_limit_files(text, expected):
    assert parse_cgroup_limit(text) == expected


def test_dry_run_divides_the_declared_host_memory_over_its_local_ranks():
    config = compose_config([*MLPERF, "plan_only=true", "plan_topology.world_size=16",
                             "plan_topology.local_world_size=8",
                             "plan_topology.device_memory_bytes=42949672960",
                             "plan_topology.host_memory_bytes=1099511627776"])
    plan = plan_for_topology(config, feature_groups(config.features))
    assert plan.caps.device_bytes == 40 * GIB
    assert plan.caps.host_bytes == 1024 * GIB // 8
    assert max(plan.hbm_bytes_per_rank) <= 40 * GIB


def test_real_job_plans_with_this_hosts_memory_not_torchrecs_default(tmp_path):
    """The MLPerf tables (104.5 GB with Adagrad state) fit TorchRec's assumed 128 GiB of host
    memory per rank, so without real caps the job went on to allocate them; planned against
    this machine's memory, the one line says they do not fit, before any allocation."""
    assert host_memory_bytes() < 100 * 10**9, "this test needs a host with less than 100 GB"
    result = run_train([*MLPERF, "plan_only=true"], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "plan does not fit: the tables do not fit on 1 x cpu ranks" in result.stderr
    assert "Largest tables: C1 (40,000,000 rows x 128" in result.stderr
    assert "Traceback" not in result.stderr
