"""The learning-rate schedule of the DLRM reference (facebookresearch/dlrm,
torchrec_dlrm/lr_scheduler.py, LRPolicyScheduler): linear warm-up, constant, polynomial
(power 2) decay floored at 1e-7, then the last decayed value for the rest of training. And the
fused embedding optimizers a CPU has."""

import json

import pytest
import torch

from tests.helpers import TINY, compose_config, run_train
from train.optimizers import MIN_DECAY_LR, WarmupDecaySchedule, lr_scale


def test_warmup_then_constant_then_polynomial_decay_then_its_last_value():
    scales = [lr_scale(step, 4, 10, 5) for step in range(17)]
    assert scales[:4] == [0.25, 0.5, 0.75, 1.0]
    assert scales[4:10] == [1.0] * 6
    assert scales[10:15] == pytest.approx([1.0, 0.64, 0.36, 0.16, 0.04])
    # Once the decay ends the reference keeps its last value; it never drops to 0.
    assert scales[15:] == pytest.approx([0.04, 0.04])


def test_no_schedule_is_constant():
    assert {lr_scale(step, 0, 0, 0) for step in range(100)} == {1.0}


def test_a_decayed_lr_never_goes_below_the_reference_floor():
    config = compose_config(["optim.warmup_steps=0", "optim.decay_start_step=0",
                             "optim.decay_steps=100000",
                             "optim.embedding_lr=0.01"])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config.optim.embedding_lr)
    schedule = WarmupDecaySchedule(optimizer, config.optim)
    schedule.set_step(99_999)  # scale 1e-10: 1e-12 without the floor
    assert schedule.current_lrs() == [MIN_DECAY_LR]
    schedule.set_step(500_000)  # long after the decay: still the floor, never 0
    assert schedule.current_lrs() == [MIN_DECAY_LR]
    schedule.set_step(0)
    assert schedule.current_lrs() == [0.01]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0, got -1"),
        (["optim.decay_start_step=-5"], "optim.decay_start_step must be >= 0, got -5"),
        (["optim.decay_steps=-2"], "optim.decay_steps must be >= 0, got -2"),
        (["optim.warmup_steps=10", "optim.decay_start_step=5", "optim.decay_steps=20"],
         "optim.decay_start_step=5 is before the warm-up ends (optim.warmup_steps=10): "
         "the decay must start after it"),
    ],
)
def test_bad_schedule_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError) as raised:
        compose_config(overrides)
    assert str(raised.value) == message


def test_warmup_without_a_decay_is_accepted():
    assert compose_config(["optim.warmup_steps=10"]).optim.warmup_steps == 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="fbgemm's CUDA build has fused Adam")
def test_fused_adam_on_cpu_is_one_line_before_training(tmp_path):
    """fbgemm's CPU build has no fused Adam: optim=adam stops with the line naming
    optim.embedding and the ways out, not an assertion from deep inside DMP."""
    result = run_train([*TINY, "optim=adam", "trainer.steps=2"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "hashrec: error: optim.embedding=adam has no fused kernel in fbgemm's CPU build (it has "
        "sgd, adagrad, rowwise_adagrad), which tables user_id, user_country, user_interests and "
        "6 more would use: pick optim.embedding=rowwise_adagrad, sharding=data_parallel "
        "(replicated tables take torch's adam), or GPUs"
    ], result.stderr[-2000:]
    assert "step " not in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="fbgemm's CUDA build has fused Adam")
def test_adam_on_cpu_trains_with_data_parallel_tables(tmp_path):
    """The way out the line names: replicated tables take torch's Adam."""
    result = run_train([*TINY, "optim=adam", "sharding=data_parallel", "trainer.steps=4",
                        "trainer.eval_every=0"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    [summary] = tmp_path.glob("outputs/**/summary.json")
    assert json.loads(summary.read_text())["steps"] == 4
