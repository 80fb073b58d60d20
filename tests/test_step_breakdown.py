"""The step breakdown: every profiled microsecond in one stage, matmul FLOPs from shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from train.step_breakdown import (
    DATA,
    DENSE_BACKWARD,
    DENSE_FORWARD,
    EMBEDDING_BACKWARD,
    ID_MAPPING,
    INPUT_DIST,
    LOOKUP,
    OPTIMIZER,
    OTHER,
    OUTPUT_DIST,
    STAGES,
    bound_shares,
    embedding_bytes_per_sample,
    load_events,
    lookups_per_sample,
    matmul_flops,
    stage_milliseconds,
    step_events,
)


def event(name: str, ts: float, dur: float, tid: int = 1, **args) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_each_microsecond_goes_to_the_stage_of_its_innermost_named_range():
    # One 1000 us step, times in us; comments say where each self time belongs.
    events = [
        event("train_step", 0, 1000),
        event("## next_batch ##", 0, 50),  # 50 data
        event("## start_sparse_data_dist 3 ##", 50, 150),  # 150 - 60 - 40 = 50 input dist
        event("## input_postproc <class 'HashingIdMapper'> 3 ##", 60, 60),  # 60 ID mapping
        event("c10d::alltoall_base_", 130, 40),  # the IDs' all-to-all: 40 input dist
        event("## forward 2 ##", 200, 400),  # 400 - 100 - 30 - 20 = 250 dense forward
        event("[lookup]_[ebc]_[table_wise]", 210, 100),  # 100 - 60 = 40 lookup
        event("fbgemm::split_embedding_codegen_forward_cpu", 220, 60),  # 60 lookup
        event("[output_dist]_[ebc]_[table_wise]", 320, 30),  # 30 output all-to-all
        event("## KJTAllToAllTensorsAwaitable wait() ##", 360, 20),  # 20 input dist
        event("## backward 2 ##", 600, 300),  # 300 - 120 - 50 = 130 dense backward
        event("torch::autograd::CppNode<SplitLookupFunction_rowwise_adagrad_Op_pt2>", 650, 120),
        event("All2All_Pooled_ReqBackward", 800, 50),  # gradients' all-to-all
        event("## optimizer 2 ##", 900, 60),  # 60 optimizer
        # 40 us of the step in no phase: other. A second thread's event never counts.
        event("## forward 2 ##", 100, 500, tid=2),
    ]
    steps, inside = step_events(events)
    stages = stage_milliseconds(steps, inside)
    expected_us = {DATA: 50, INPUT_DIST: 50 + 40 + 20, ID_MAPPING: 60, LOOKUP: 40 + 60,
                   OUTPUT_DIST: 30 + 50, DENSE_FORWARD: 250, EMBEDDING_BACKWARD: 120,
                   DENSE_BACKWARD: 130, OPTIMIZER: 60, OTHER: 40}
    assert stages == pytest.approx({s: expected_us.get(s, 0) / 1000 for s in STAGES})
    assert sum(stages.values()) == pytest.approx(1.0)


def test_stages_are_per_step_means():
    events = [event("train_step", 0, 100), event("## forward 1 ##", 0, 100),
              event("train_step", 200, 300), event("## forward 2 ##", 200, 300)]
    stages = stage_milliseconds(*step_events(events))
    assert stages[DENSE_FORWARD] == pytest.approx(0.2)


def test_matmul_flops_of_a_known_mlp_from_a_real_trace(tmp_path: Path):
    batch, widths = 16, (64, 32, 1)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    inputs = torch.randn(batch, widths[0])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        with torch.profiler.record_function("train_step"):
            mlp(inputs).sum().backward()
            torch.bmm(torch.randn(4, 5, 6), torch.randn(4, 6, 7))
    path = tmp_path / "trace.json"
    profiler.export_chrome_trace(str(path))
    flops = matmul_flops(*step_events(load_events(path)))
    # Forward: 2 B n_in n_out per layer. Backward: the weight gradient of each layer, and the
    # input gradient of every layer but the first (its input needs none).
    forward = sum(2 * batch * n_in * n_out for n_in, n_out in zip(widths, widths[1:]))
    backward = forward + 2 * batch * widths[1] * widths[2]
    assert flops == {"fp32": forward + backward + 2 * 4 * 5 * 6 * 7}


def test_embedding_bytes_count_rows_pooled_vectors_and_state():
    # One key, 1 ID of dim 8, row-wise Adagrad: read row 8, write pooled 8, read grad 8,
    # read + write row 16, read + write state 2 = 42 floats.
    assert embedding_bytes_per_sample([(1, 8)], "rowwise_adagrad") == 42 * 4
    # Two keys; a bag of 3 IDs pools once: 3*8 + 2*8 + 3*(16 + 0) for SGD.
    assert embedding_bytes_per_sample([(3, 8), (1, 8)], "sgd") == (88 + 40) * 4


def test_bound_shares():
    shares = bound_shares(
        step_seconds=0.5,
        flops_per_step={"fp32": 100e9, "bf16": 200e9},
        flops_per_second={"fp32": 100e9, "bf16": 400e9},
        embedding_bytes_per_step=1e9,
        copy_bytes_per_second=10e9,
    )
    assert shares["compute_bound_seconds"] == pytest.approx(1.5)
    assert shares["compute_bound_share"] == pytest.approx(3.0)
    assert shares["memory_bound_share"] == pytest.approx(0.2)


def test_a_matmul_inside_a_counted_matmul_counts_once():
    shapes = {"Input Dims": [[8], [4, 16], [16, 8]], "Input type": ["float"] * 3}
    events = [
        event("train_step", 0, 100),
        event("aten::addmm", 10, 50, **shapes),
        # As a kernel that computes through another op would record it.
        event("aten::mm", 20, 30, **{"Input Dims": [[4, 16], [16, 8]],
                                     "Input type": ["float", "float"]}),
        event("aten::bmm", 70, 10, **{"Input Dims": [[3, 2, 5], [3, 5, 7]],
                                      "Input type": ["c10::BFloat16"] * 2}),
    ]
    assert matmul_flops(*step_events(events)) == {"fp32": 2 * 4 * 16 * 8,
                                                  "bf16": 2 * 3 * 2 * 5 * 7}


def test_lookups_count_every_pooled_key_with_its_features_ids():
    from tests.helpers import TINY, compose_config
    from train.build import feature_groups

    def lookups(*overrides):
        config = compose_config([*TINY, *overrides])
        return lookups_per_sample(feature_groups(config.features, config.hashing))

    # The default features: 9 keys of dim 8, user_interests a bag of 4 IDs.
    assert sorted(lookups()) == sorted([(1, 8)] * 8 + [(4, 8)])
    # Multi-hash: the 5 hashed features have 2 probes each and (one ID per sample) an
    # importance key of dim 4; user_interests' bag has no importance table; 4 unhashed keys.
    plain = lookups("hashing=multi_hash", "hashing.importance_share=0")
    assert sorted(plain) == sorted([(1, 8)] * (4 + 2 * 4) + [(4, 8)] * 2)
    # With importance weights: one more key of dim 4 for each of the 4 one-ID hashed features.
    assert sorted(lookups("hashing=multi_hash")) == sorted(plain + [(1, 4)] * 4)
