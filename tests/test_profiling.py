"""trainer.profile: a trace per rank that parses and holds the training step; off: nothing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, compose_config, run_train
from tests.wandb_records import find_run_files, read_records
from train.distributed import DistributedContext
from train.loop import STEP_RANGE, step_range
from train.profiling import profiling_hooks
from train.step_breakdown import (
    DENSE_BACKWARD,
    DENSE_FORWARD,
    EMBEDDING_BACKWARD,
    ID_MAPPING,
    INPUT_DIST,
    LOOKUP,
    OPTIMIZER,
    OTHER,
    OUTPUT_DIST,
    trace_breakdown,
)

# fbgemm's CPU forward of a table-batched embedding lookup (on CUDA its name differs).
LOOKUP_OP = "fbgemm::split_embedding_codegen_forward_cpu"


def event_names(path: Path) -> set[str]:
    trace = json.loads(path.read_text())
    return {event["name"] for event in trace["traceEvents"] if event.get("ph") == "X"}


def test_two_ranks_write_a_trace_each_and_rank_0_logs_them_to_wandb(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = run_train(
        [*TINY, "trainer.steps=6", "trainer.eval_every=0", "sharding=row_wise",
         "logger.mode=offline", "trainer.profile=true", "trainer.profile_steps=[2,2]"],
        cwd=tmp_path, launcher=[torchrun, "--standalone", "--nproc_per_node", "2"],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = [path.parent for path in tmp_path.glob("outputs/**/summary.json")]
    traces = sorted((run_dir / "profile").iterdir())
    assert [path.name for path in traces] == ["rank_0.pt.trace.json", "rank_1.pt.trace.json"]
    for path in traces:
        names = event_names(path)
        assert STEP_RANGE in names and LOOKUP_OP in names, path
        steps = [e for e in json.loads(path.read_text())["traceEvents"] if e["name"] == STEP_RANGE]
        assert len(steps) == 2  # profile_steps=[2,2]: two steps, not the run's six
    assert "profile: steps 2..3" in result.stdout
    # The step breakdown (scripts/benchmark.py) finds TorchRec's pipeline phases and the
    # sharded collections' stages in a real trace: every stage that ran takes time, and the
    # loop's own bookkeeping outside the pipeline ("other") stays small.
    for path in traces:
        split = trace_breakdown(path)
        stages = split["stage_ms"]
        assert sum(stages.values()) == pytest.approx(split["profiled_step_ms"], rel=1e-6)
        for stage in (ID_MAPPING, INPUT_DIST, LOOKUP, OUTPUT_DIST, DENSE_FORWARD,
                      EMBEDDING_BACKWARD, DENSE_BACKWARD, OPTIMIZER):
            assert stages[stage] > 0, (path.name, stage, stages)
        assert stages[OTHER] < 0.05 * split["profiled_step_ms"], stages
        assert split["flops_per_step"]["fp32"] > 0
    [run_file] = find_run_files(run_dir)
    artifacts = [r.artifact for r in read_records(run_file)
                 if r.WhichOneof("record_type") == "artifact"]
    profiles = [a for a in artifacts if a.type == "profile"]
    assert len(profiles) == 1
    assert sorted(entry.path for entry in profiles[0].manifest.contents) == [
        "rank_0.pt.trace.json", "rank_1.pt.trace.json"]


def test_profile_off_builds_no_profiler_and_adds_no_range(tmp_path):
    config = compose_config(TINY)
    assert config.trainer.profile is False
    context = DistributedContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    assert profiling_hooks(config.trainer, tmp_path, context, None, print) == []
    # The loop's per-step range exists only while a profiler records.
    assert not torch.autograd._profiler_enabled()
    assert type(step_range()).__name__ == "nullcontext"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.profile_steps=[3]"], "trainer.profile_steps must be [first step >= 0, number"),
        (["trainer.profile_steps=[0,0]"], "trainer.profile_steps must be"),
        (["trainer.profile=true", "trainer.steps=5", "trainer.profile_steps=[4,2]"],
         "trainer.profile_steps=[4, 2] ends after trainer.steps=5"),
    ],
)
def test_bad_profile_steps_fail_at_config_time(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        compose_config(overrides)
