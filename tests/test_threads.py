"""Each rank's intra-op threads: its share of the CPUs it may use unless trainer.threads or
OMP_NUM_THREADS says otherwise, the line the job prints, and idle OpenMP threads sleeping."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY, compose_config, run_ranks
from train.distributed import DistributedContext
from train.run import ConfigError, set_threads
from train.threads import (
    cgroup_cpu_limit,
    choose_threads,
    chosen_omp_num_threads,
    ranks_sharing_cpus,
    limit_openmp_spinning,
)

needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least 2 usable cores",
)


def test_auto_splits_the_usable_cores_among_the_ranks_sharing_them():
    alone = choose_threads(None, None, [0, 1], 1)
    assert (alone.intra_op, alone.reason, alone.auto) == (2, "2 CPUs / 1 local rank", True)
    shared = choose_threads(None, None, [0, 1], 2)
    assert (shared.intra_op, shared.reason) == (1, "2 CPUs / 2 local ranks")
    assert choose_threads(None, None, list(range(16)), 3).intra_op == 5
    assert choose_threads(None, None, [3], 2).intra_op == 1  # never none
    # Hyperthread siblings (c and c + 4) are one core.
    core_of = {cpu: cpu % 4 for cpu in range(8)}
    siblings = choose_threads(None, None, list(range(8)), 2, core_of=core_of)
    assert (siblings.intra_op, siblings.reason) == (2, "4 cores of 8 CPUs / 2 local ranks")
    # A cgroup quota below the mask caps it (whole CPUs only); one above it changes nothing.
    quota = choose_threads(None, None, list(range(64)), 2, cpu_limit=4.5)
    assert (quota.intra_op, quota.reason) == (2, "a CPU quota of 4.5 of 64 CPUs / 2 local ranks")
    assert choose_threads(None, None, list(range(64)), 1, cpu_limit=0.5).intra_op == 1
    assert choose_threads(None, None, [0, 1], 1, cpu_limit=8.0) == alone


def test_a_setting_wins_over_auto():
    configured = choose_threads(3, "5", [0, 1], 2)
    assert (configured.intra_op, configured.reason, configured.auto) == (
        3, "trainer.threads=3", False
    )
    from_env = choose_threads(None, "5", [0, 1], 2)
    assert (from_env.intra_op, from_env.reason, from_env.auto) == (5, "OMP_NUM_THREADS=5", False)
    assert choose_threads(None, "4,2", [0, 1], 1).intra_op == 4  # nested levels: the outer
    for bad in ("", "0", "two", "-1"):
        with pytest.raises(ValueError, match="^OMP_NUM_THREADS must be a positive number"):
            choose_threads(None, bad, [0, 1], 1)


def test_torchruns_own_one_thread_is_no_setting():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "1"}
    assert chosen_omp_num_threads(torchrun, local_world_size=2) is None
    # One rank per host (torchrun sets nothing then), another value, or no torchrun: a choice.
    assert chosen_omp_num_threads(torchrun, local_world_size=1) == "1"
    assert chosen_omp_num_threads({**torchrun, "OMP_NUM_THREADS": "2"}, 2) == "2"
    assert chosen_omp_num_threads({"OMP_NUM_THREADS": "1"}, 2) == "1"
    assert chosen_omp_num_threads({}, 2) is None


def test_ranks_sharing_cpus_counts_same_host_and_same_set():
    everyone = [("a", (0, 1)), ("a", (0, 1)), ("a", (2, 3)), ("b", (0, 1))]
    assert [ranks_sharing_cpus(everyone, rank) for rank in range(4)] == [2, 2, 1, 1]


def test_cgroup_cpu_limit_reads_v2_and_v1_quotas(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None  # neither file
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.5
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5  # the tighter of the two
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert cgroup_cpu_limit(tmp_path) == 2.5


def test_the_line_says_how_idle_threads_wait():
    choice = choose_threads(None, None, [0, 1], 2)
    environ: dict[str, str] = {}
    limit_openmp_spinning(environ)
    assert environ == {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": "PASSIVE"}
    assert choice.describe(environ) == (
        "threads: 1 intra-op per rank (2 CPUs / 2 local ranks), 1 inter-op, idle OpenMP "
        "threads spin briefly, then sleep (GOMP_SPINCOUNT=10000, OMP_WAIT_POLICY=PASSIVE)"
    )
    # A wait the user chose stays, and the line says it.
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        environ = dict(chosen)
        limit_openmp_spinning(environ)
        assert environ == chosen
        [(key, value)] = chosen.items()
        assert choice.describe(environ).endswith(f", 1 inter-op, {key}={value}")
    assert choice.describe({}).endswith("idle OpenMP threads spin (OMP_WAIT_POLICY unset)")


def _set_threads_worker(rank: int, world_size: int, out_path: str) -> None:
    """Both layouts in one pair of processes: torchrun's (every rank sees the host's mask),
    then ``srun --cpu-bind``'s (each task its own CPU)."""
    context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    results = []
    for own_core in (False, True):
        if own_core:
            os.sched_setaffinity(0, [rank])
        torch.set_num_threads(7)
        choice = set_threads(compose_config(TINY), context)
        results.append({"reason": choice.reason, "threads": torch.get_num_threads()})
    torch.save(results, f"{out_path}.{rank}")


@needs_two_cores
def test_two_ranks_on_two_cores_run_one_thread_each(tmp_path):
    out_path = str(tmp_path / "threads")
    cpus = len(os.sched_getaffinity(0))
    run_ranks(_set_threads_worker, 2, out_path)
    results = [torch.load(f"{out_path}.{rank}") for rank in range(2)]
    shared = {"reason": f"{cpus} CPUs / 2 local ranks", "threads": cpus // 2}
    own = {"reason": "1 CPU / 1 local rank", "threads": 1}
    assert results == [[shared, own]] * 2


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_trainer_threads_then_omp_num_threads_set_the_count(monkeypatch, restore_threads):
    context = DistributedContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_threads(compose_config(TINY), context).reason == "OMP_NUM_THREADS=3"
    assert torch.get_num_threads() == 3
    assert set_threads(compose_config([*TINY, "trainer.threads=5"]), context).intra_op == 5
    assert torch.get_num_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(ConfigError, match="^OMP_NUM_THREADS must be a positive number of "
                       "threads, got 'lots'$"):
        set_threads(compose_config(TINY), context)
    with pytest.raises(ValueError, match="trainer.threads must be >= 1"):
        compose_config([*TINY, "trainer.threads=0"])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_a_job_on_one_cpu_prints_one_thread_and_short_spins(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    result = subprocess.run(
        [sys.executable, "-m", "train", *TINY, "plan_only=true"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, [min(os.sched_getaffinity(0))]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "threads: 1 intra-op per rank (1 CPU / 1 local rank), 1 inter-op, idle OpenMP threads "
        "spin briefly, then sleep (GOMP_SPINCOUNT=10000, OMP_WAIT_POLICY=PASSIVE)\n"
    ) in result.stdout
