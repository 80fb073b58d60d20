"""scripts/scaling_curves.py: its sweeps are valid jobs, and it reads each rank's peak RSS from
metrics.jsonl as the job writes it (no job runs here)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.helpers import REPO, compose_config
from train.step_stats import RANK_FIGURES, window_metrics


def load_scaling_curves():
    path = REPO / "scripts" / "scaling_curves.py"
    spec = importlib.util.spec_from_file_location("scaling_curves", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


curves = load_scaling_curves()


def report_window(peaks: list[int]) -> dict:
    """A report window as the loop logs it, for ranks whose peak RSS is ``peaks``."""
    per_rank = torch.zeros(len(peaks), len(RANK_FIGURES), dtype=torch.float64)
    per_rank[:, RANK_FIGURES.index("step_seconds")] = 0.05
    per_rank[:, RANK_FIGURES.index("peak_rss_bytes")] = torch.tensor(peaks, dtype=torch.float64)
    planned = [1] * len(peaks)
    return window_metrics(per_rank, 2048, 10, False, planned, planned)


def test_peak_rss_is_each_ranks_highest_report_in_rank_order(tmp_path):
    # 12 ranks: rank10 and rank11 sort before rank2 as text. The second window raises some
    # ranks' peaks; an eval record has no step time and no memory.
    first = [1000 + rank for rank in range(12)]
    second = [value + (500 if rank % 3 == 0 else 0) for rank, value in enumerate(first)]
    records = [{"kind": "config", "config": {}},
               {"kind": "metrics", "step": 10, **report_window(first)},
               {"kind": "metrics", "step": 50, **report_window(second)},
               {"kind": "metrics", "step": 50, "eval/auc": 0.7}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    windows = curves.metrics_windows(path)
    assert len(windows) == 2
    assert curves.peak_rss_per_rank(windows) == second


def test_peak_rss_of_a_missing_rank_is_an_error():
    window = report_window([10, 20, 30])
    del window["mem/peak_rss_bytes/rank1"]
    with pytest.raises(ValueError, match=r"ranks \[0, 2\]"):
        curves.peak_rss_per_rank([window])


def test_steps_measure_the_same_samples_per_rank_with_a_floor():
    warm_up = curves.WARMUP_STEPS
    assert curves.steps_for(2048, 81920, 20) == warm_up + 40
    assert curves.steps_for(256, 81920, 20) == warm_up + 320
    assert curves.steps_for(8192, 81920, 20) == warm_up + 20  # 10 would be too few
    assert curves.steps_for(3000, 10000, 1) == warm_up + 4  # rounded up


def config_value(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("name", list(curves.SWEEPS))
def test_every_point_is_a_valid_job_with_its_value_in_place(name):
    """Each point's overrides compose into the real config (a wrong key would fail the job only
    minutes into a sweep), with every swept key at the point's value and the batch the
    script plans its steps for."""
    sweep = curves.SWEEPS[name]
    jobs = curves.points([name])
    assert [(p.value, p.ranks) for p in jobs] == [(v, r) for v in sweep.values for r in (1, 2)]
    for point in jobs[::2]:
        config = compose_config(point.overrides())
        for key in sweep.keys:
            assert config_value(config, key) == point.value, key
        assert config.trainer.batch_size == point.batch_size()
        assert config.features.name == "reference_shape"
        if config.features.embedding_dim != 64:  # the dot interaction needs them equal
            assert config.model.dense_layer_sizes[-1] == config.features.embedding_dim


def test_passes_merge_into_each_points_median_pass_and_failures_only_where_all_failed():
    def report(date: str, *results: dict) -> dict:
        return {"machine": {"date": date, "cpu": "x", "cpus": 2}, "sweeps": ["rows"],
                "results": list(results)}

    def run(value: int, ranks: int, rate: float) -> dict:
        return {"sweep": "rows", "value": value, "ranks": ranks, "samples_per_sec": rate,
                "peak_rss_bytes_per_rank": [int(rate)] * ranks}

    failed = {"sweep": "rows", "value": 300, "ranks": 1, "error": "killed"}
    merged = curves.merge([
        report("2026-12-02", run(100, 1, 30.0), run(100, 2, 50.0), failed),
        report("2026-12-01", run(100, 1, 10.0), run(100, 2, 70.0), run(300, 1, 5.0)),
        report("2026-12-03", run(100, 1, 20.0), run(100, 2, 60.0), failed),
    ])
    points = {(r["value"], r["ranks"]): r for r in merged["results"]}
    assert points[(100, 1)]["samples_per_sec"] == 20.0
    assert points[(100, 1)]["peak_rss_bytes_per_rank"] == [20]  # the median pass's, whole
    assert points[(100, 1)]["samples_per_sec_all"] == [30.0, 10.0, 20.0]
    assert points[(100, 2)]["samples_per_sec"] == 60.0
    assert points[(300, 1)]["samples_per_sec"] == 5.0
    assert merged["passes"] == 3 and merged["machine"]["date"] == "2026-12-01"
    only_failed = curves.merge([report("2026-12-01", failed)])
    assert only_failed["results"] == [failed]
