"""Launching on a cluster: the install check, the GPU a rank takes, Slurm node lists, the
process group's timeout, ``make setup ACCEL=...``, and one job over two torchrun agents."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import REPO, TINY, compose_config, free_port, run_train
from tests.wandb_records import find_run_files, read_records
from train.distributed import (
    LaunchError,
    _slurm_master_address,
    expand_nodelist,
    init_distributed,
    local_device_index,
)
from train.install_check import (
    CPU_PACKAGE,
    CUDA_PACKAGE,
    InstallFacts,
    gpu_evidence,
    install_problem,
    installed_for,
    seen_on_this_node,
    use_cuda,
)
from train.run_dir import run_id

TORCHRUN = str(Path(sys.executable).parent / "torchrun")

# --- the install check, as a pure function of what a rank sees --------------------------------

GPUS = "nvidia-smi -L lists 8 GPU(s)"
TORCH_BUILDS = {  # name -> (torch.__version__, torch.version.cuda, torch.cuda.is_available())
    "cpu": ("2.13.0+cpu", None, False),
    "cuda": ("2.13.0", "13.0", True),
    "cuda, old driver": ("2.13.0", "13.0", False),
}
# (GPUs visible, torch build, fbgemm package, HASHREC_ALLOW_CPU_ON_GPU_NODE) -> the job runs
# on "cuda" or "cpu", or fails with a line holding this fix. Every combination that can occur
# (torch cannot use GPUs that nothing shows).
EXPECTED = {
    (False, "cpu", CPU_PACKAGE, False): "cpu",
    (False, "cpu", CPU_PACKAGE, True): "cpu",
    (False, "cpu", CUDA_PACKAGE, False): "make setup ACCEL=cpu",  # cannot even load
    (False, "cpu", CUDA_PACKAGE, True): "make setup ACCEL=cpu",
    # A GPU venv on a CPU node trains on the CPUs: nothing is lost.
    (False, "cuda, old driver", CPU_PACKAGE, False): "cpu",
    (False, "cuda, old driver", CPU_PACKAGE, True): "cpu",
    (False, "cuda, old driver", CUDA_PACKAGE, False): "cpu",
    (False, "cuda, old driver", CUDA_PACKAGE, True): "cpu",
    # GPUs with a venv built on a login node: never a silent fall-back to gloo.
    (True, "cpu", CPU_PACKAGE, False): "make setup ACCEL=cuda",
    (True, "cpu", CPU_PACKAGE, True): "cpu",
    (True, "cpu", CUDA_PACKAGE, False): "make setup ACCEL=cuda",
    (True, "cpu", CUDA_PACKAGE, True): "make setup ACCEL=cuda",
    (True, "cuda, old driver", CPU_PACKAGE, False): "make setup ACCEL=cuda TORCH_INDEX_URL=",
    (True, "cuda, old driver", CPU_PACKAGE, True): "cpu",
    (True, "cuda, old driver", CUDA_PACKAGE, False): "make setup ACCEL=cuda TORCH_INDEX_URL=",
    (True, "cuda, old driver", CUDA_PACKAGE, True): "cpu",
    (True, "cuda", CPU_PACKAGE, False): "make setup ACCEL=cuda",  # no CUDA kernels
    (True, "cuda", CPU_PACKAGE, True): "cpu",
    (True, "cuda", CUDA_PACKAGE, False): "cuda",
    (True, "cuda", CUDA_PACKAGE, True): "cpu",
}


def facts(gpus: bool, build: str, packages: tuple[str, ...], allow_cpu: bool) -> InstallFacts:
    version, cuda, usable = TORCH_BUILDS[build]
    return InstallFacts(GPUS if gpus else None, version, cuda, usable, packages, allow_cpu)


def outcome(seen: InstallFacts) -> str:
    problem = install_problem(seen)
    if problem is not None:
        assert "\n" not in problem and "make setup" in problem, problem
        return problem
    return "cuda" if use_cuda(seen) else "cpu"


@pytest.mark.parametrize("case", sorted(EXPECTED), ids=str)
def test_install_check_with_one_fbgemm_package(case):
    gpus, build, package, allow_cpu = case
    expected = EXPECTED[case]
    got = outcome(facts(gpus, build, (package,), allow_cpu))
    if expected in ("cuda", "cpu"):
        assert got == expected
    else:
        assert expected in got, got


def test_install_check_names_the_evidence_and_the_escape_hatch():
    # The login-node venv on a GPU node, the case this check exists for.
    got = install_problem(facts(True, "cpu", (CPU_PACKAGE,), False))
    assert GPUS in got and "torch 2.13.0+cpu (a CPU build)" in got
    assert "HASHREC_ALLOW_CPU_ON_GPU_NODE=1" in got


@pytest.mark.parametrize("packages", [(), (CUDA_PACKAGE, CPU_PACKAGE)], ids=["none", "both"])
def test_install_check_without_exactly_one_fbgemm_package(packages):
    for gpus, build, _, allow_cpu in EXPECTED:
        got = outcome(facts(gpus, build, packages, allow_cpu))
        assert f"make setup ACCEL={'cuda' if gpus else 'cpu'}" in got, got


def test_gpu_evidence():
    assert gpu_evidence(2, None, None, False) == "torch.cuda sees 2 GPU(s)"
    assert "nvidia-smi -L lists 4" in gpu_evidence(0, None, 4, True)
    # nvidia-smi answers for the node: a CPU job on a GPU node still has /dev/nvidia0.
    assert gpu_evidence(0, None, 0, True) is None
    assert gpu_evidence(0, None, None, True) == "/dev/nvidia0 exists"
    assert gpu_evidence(0, "0,1", None, False) == "CUDA_VISIBLE_DEVICES=0,1"
    # GPUs hidden on purpose, whatever else is there.
    for hidden in ("", "-1", "NoDevFiles"):
        assert gpu_evidence(0, hidden, 4, True) is None
    assert gpu_evidence(0, None, None, False) is None


def test_install_check_passes_on_this_machine():
    seen = seen_on_this_node({})
    assert install_problem(seen) is None
    assert use_cuda(seen) == torch.cuda.is_available()


def test_install_check_stops_a_cpu_venv_where_gpus_are_visible(tmp_path):
    """A CPU torch where CUDA_VISIBLE_DEVICES says GPUs were given (and no nvidia-smi or
    /dev/nvidia0 here says otherwise): one line, exit 2, before any process group or plan."""
    if torch.version.cuda or shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        pytest.skip("needs a CPU build of torch on a machine without GPUs")
    result = run_train([*TINY, "trainer.steps=2"], cwd=tmp_path,
                       env={"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hashrec: error: GPUs are visible"), lines
    assert "CUDA_VISIBLE_DEVICES=0" in lines[0] and "make setup ACCEL=cuda" in lines[0]
    assert "world size" not in result.stdout
    # The escape hatch trains on the CPUs.
    result = run_train([*TINY, "trainer.steps=2", "trainer.eval_every=0"], cwd=tmp_path,
                       env={"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1",
                            "HASHREC_ALLOW_CPU_ON_GPU_NODE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 1 (gloo, cpu)" in result.stdout


def test_stop_if_unfit_needs_no_torchrec():
    """The check python -m train can run before importing torchrec (which fails to import
    where a CUDA fbgemm meets a CPU torch): one line, exit 2, and torchrec never imported."""
    if torch.version.cuda or shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        pytest.skip("needs a CPU build of torch on a machine without GPUs")
    code = ("import sys; from train.install_check import stop_if_unfit\n"
            "try:\n    stop_if_unfit()\nfinally:\n    assert 'torchrec' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hashrec: error: GPUs are visible"), lines
    passed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert passed.returncode == 0 and passed.stderr == "", passed.stderr


def test_installed_for_checks_what_make_setup_installed():
    assert installed_for("cpu", None, (CPU_PACKAGE,)) is None
    assert installed_for("cpu", "13.0", (CPU_PACKAGE,)) is None
    assert installed_for("cuda", "13.0", (CUDA_PACKAGE,)) is None
    assert "CPU build of torch" in installed_for("cuda", None, (CUDA_PACKAGE,))
    assert "TORCH_INDEX_URL" in installed_for("cuda", None, (CUDA_PACKAGE,))
    assert "wants fbgemm-gpu alone" in installed_for("cuda", "13.0", (CPU_PACKAGE,))
    assert "wants fbgemm-gpu-cpu alone" in installed_for("cpu", None, (CUDA_PACKAGE, CPU_PACKAGE))


# --- the GPU a local rank takes --------------------------------------------------------------


def test_local_device_index():
    # torchrun: every rank sees all 8 GPUs of its node and takes its own.
    assert [local_device_index(rank, 8) for rank in range(8)] == list(range(8))
    # srun --gpus-per-task=1: every task sees one GPU, cuda:0, whatever its local rank.
    assert [local_device_index(rank, 1) for rank in range(8)] == [0] * 8
    assert local_device_index(3, 2) == 1


# --- Slurm node lists ------------------------------------------------------------------------

NODELISTS = {
    "node[01-04]": ["node01", "node02", "node03", "node04"],
    "a[1-2,5],b3": ["a1", "a2", "a5", "b3"],
    "n[8-10]": ["n8", "n9", "n10"],
    "n[008-10]": ["n008", "n009", "n010"],  # the first number's width
    "n[1-03]": ["n1", "n2", "n3"],
    "h[1-3,07-09]": ["h1", "h2", "h3", "h07", "h08", "h09"],
    "r[1-2]n[1-2]": ["r1n1", "r1n2", "r2n1", "r2n2"],
    "rack[1-2]-node[01-02],login": [
        "rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02", "login"],
    "n[1]": ["n1"],
    "a,b": ["a", "b"],
    "a[1-2],a1": ["a1", "a2", "a1"],
    "n[1-2] n3": ["n1", "n2", "n3"],
    "localhost": ["localhost"],
}
# Suffixes after a bracket group: newer Slurm writes them; Slurm 22.05 rejects them.
NODELISTS_WITH_SUFFIX = {
    "gpu-[001-003]-x": ["gpu-001-x", "gpu-002-x", "gpu-003-x"],
    "n[0-1]x[2-3]y": ["n0x2y", "n0x3y", "n1x2y", "n1x3y"],
}
BAD_NODELISTS = ["n[3-1]", "n[1-2", "n[1-2]],x", "n[a-b]", "n[]", "n[1,,2]", "n[-2]"]


@pytest.mark.parametrize("nodelist", [*NODELISTS, *NODELISTS_WITH_SUFFIX])
def test_expand_nodelist(nodelist):
    assert expand_nodelist(nodelist) == {**NODELISTS, **NODELISTS_WITH_SUFFIX}[nodelist]


@pytest.mark.parametrize("nodelist", BAD_NODELISTS)
def test_expand_nodelist_rejects_what_slurm_rejects(nodelist):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(nodelist)


def test_expand_nodelist_agrees_with_scontrol(tmp_path):
    """The same lists through the real ``scontrol show hostnames`` (it needs only a
    slurm.conf to read)."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=c\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for nodelist, hosts in NODELISTS.items():
        shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env,
                               capture_output=True, text=True, timeout=30, check=True)
        assert shown.stdout.split() == hosts == expand_nodelist(nodelist), nodelist
    for nodelist in BAD_NODELISTS:
        shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env,
                               capture_output=True, text=True, timeout=30, check=False)
        if nodelist != "n[1-2":  # scontrol prints "n]" for that one
            assert shown.stdout.split() == [], nodelist


def test_master_address_without_scontrol(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol on it
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[07-08],gpu-b1")
    assert _slurm_master_address() == "gpu-a07"
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[07-08")
    with pytest.raises(LaunchError, match=r"SLURM_JOB_NODELIST: node list 'gpu-a\[07-08'"):
        _slurm_master_address()


# --- the process group's timeout -------------------------------------------------------------


def test_dist_timeout_config():
    assert compose_config([]).trainer.dist_timeout_s == 1800.0
    assert compose_config(["trainer.dist_timeout_s=60"]).trainer.dist_timeout_s == 60.0
    with pytest.raises(Exception, match=r"trainer.dist_timeout_s must be > 0"):
        compose_config(["trainer.dist_timeout_s=0"])


def _timeout_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    context = init_distributed(timeout_s=77.0)
    group = dist.group.WORLD
    backend = group._get_backend(torch.device("cpu"))  # the gloo backend and its options
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "backend": context.backend,
        "group_timeout_s": backend.options._timeout.total_seconds(),
        "store_timeout_s": dist.distributed_c10d._get_default_store().timeout.total_seconds(),
    }))
    dist.barrier()
    dist.destroy_process_group()


def test_dist_timeout_reaches_the_process_group(tmp_path):
    mp.start_processes(_timeout_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"backend": "gloo", "group_timeout_s": 77.0, "store_timeout_s": 77.0}


# --- make setup ACCEL=... (make -n: what it would run, nothing installed) --------------------


def make_dry_run(root: Path, *args: str, nvidia_smi: bool = False) -> subprocess.CompletedProcess:
    bin_dir = root / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi:  # a GPU node's driver tools
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["make", "-n", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def make_checkout(root: Path, built_for: str | None) -> Path:
    """A checkout's Makefile and pyproject.toml, with a venv built for ``built_for``."""
    root.mkdir()
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    if built_for:
        (root / ".venv").mkdir()
        (root / ".venv" / ".accel").write_text(built_for + "\n")
        (root / ".venv" / f".installed-{built_for}").touch()
    return root


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_accel(tmp_path):
    # A fresh checkout: auto follows nvidia-smi.
    fresh = make_checkout(tmp_path / "fresh", None)
    plan = make_dry_run(fresh, "setup").stdout
    assert "torch==2.13.0 fbgemm-gpu-cpu==1.8.0" in plan and "--expect cpu" in plan
    plan = make_dry_run(fresh, "setup", nvidia_smi=True).stdout
    assert "torch==2.13.0 fbgemm-gpu==1.8.0" in plan and "--expect cuda" in plan
    # A venv built with ACCEL=cuda on a login node (no nvidia-smi): make test keeps it.
    gpu_venv = make_checkout(tmp_path / "gpu_venv", "cuda")
    result = make_dry_run(gpu_venv, "test")
    assert "pip" not in result.stdout and "pytest" in result.stdout, result.stdout
    # A CPU venv asked for cuda: torch and fbgemm-gpu-cpu go, the CUDA ones come.
    cpu_venv = make_checkout(tmp_path / "cpu_venv", "cpu")
    assert "pip" not in make_dry_run(cpu_venv, "setup").stdout
    plan = make_dry_run(cpu_venv, "setup", "ACCEL=cuda").stdout
    assert "pip uninstall --quiet -y torch fbgemm-gpu-cpu" in plan
    assert "torch==2.13.0 fbgemm-gpu==1.8.0" in plan and "echo cuda > .venv/.accel" in plan
    plan = make_dry_run(
        cpu_venv, "setup", "ACCEL=cuda", "TORCH_INDEX_URL=https://wheels.example.invalid/whl/cu126"
    ).stdout
    assert "--index-url https://wheels.example.invalid/whl/cu126 torch==2.13.0 fbgemm-gpu" in plan
    assert "bash scripts/gpu_check.sh" in make_dry_run(cpu_venv, "gpu-check").stdout
    wrong = make_dry_run(cpu_venv, "setup", "ACCEL=gpu")
    assert wrong.returncode != 0 and "ACCEL=gpu is not one of auto, cuda, cpu" in wrong.stderr


# --- the run directory of a job over several torchrun agents ----------------------------------


def test_run_dir_over_several_nodes_needs_a_rendezvous_id(monkeypatch, capsys):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    # torchrun's static rendezvous (--nnodes 2 --node_rank 1 --master_addr ...): no id.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        run_id()
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "hashrec: error: torchrun runs 4 ranks over several nodes" in lines[0]
    assert "--rdzv_id" in lines[0]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert run_id() == "torchrun-job-7"
    # One node: its agent's start time, shared by its ranks.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", run_id())


# --- one job over two torchrun agents --------------------------------------------------------

# Timing and memory differ between runs; where W&B writes is a path.
RUN_SPECIFIC = {"samples_per_sec", "wall_seconds", "peak_rss_bytes", "wandb_dir"}


def comparable(summary: dict) -> dict:
    """A summary without what differs between two runs of the same job (times, memory)."""
    kept = {key: value for key, value in summary.items() if key not in RUN_SPECIFIC}
    kept["evals"] = [{k: v for k, v in item.items() if k != "seconds"} for item in kept["evals"]]
    return kept


def test_two_torchrun_agents_form_one_job_like_one_agent(tmp_path):
    """Two agents of one rank each, rendezvousing as slurm/train.sbatch's nodes do (c10d on
    the first node's address, the same id), train exactly like one agent with two ranks; both
    agents' ranks keep one run directory, named after the rendezvous id, as the W&B group."""
    overrides = [*TINY, "trainer.steps=6", "trainer.eval_every=3", "sharding=row_wise"]
    rendezvous_id = f"two-agents-{uuid.uuid4().hex[:8]}"
    two_agents = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", rendezvous_id,
                  "-m", "train", *overrides, "logger.mode=offline",
                  "logger.group=${hashrec_run_id:}"]
    one_agent = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "train", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    # All three agents at once (the test's time is mostly start-up).
    launches = [(one_agent, "one"), (two_agents, "two"), (two_agents, "two")]
    agents = [subprocess.Popen(command, cwd=tmp_path / name, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for command, name in launches]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (_, stderr) in zip(agents, outputs):
        assert agent.returncode == 0, stderr[-3000:]

    two = tmp_path / "two"
    run_dirs = [path.parent for path in two.glob("outputs/**/.hydra")]
    assert run_dirs == [two / "outputs" / f"torchrun-{rendezvous_id}"]  # one, for all ranks
    run_dir = run_dirs[0]
    # Rank 1, on the second agent, wrote its checkpoint shard there too.
    assert len(list(run_dir.glob("checkpoints/*/__1_*.distcp"))) == 1
    summaries = [json.loads(path.read_text()) for path in
                 [*(tmp_path / "one").glob("outputs/**/summary.json"), run_dir / "summary.json"]]
    assert len(summaries) == 2
    one, both = (comparable(summary) for summary in summaries)
    assert one == both  # state digest, losses, AUCs, plan, hashing report
    assert both["world_size"] == 2 and both["steps"] == 6
    groups = {record.run.run_group for path in find_run_files(run_dir)
              for record in read_records(path) if record.WhichOneof("record_type") == "run"}
    assert groups == {f"torchrun-{rendezvous_id}"}
