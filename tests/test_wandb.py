"""W&B logging read back from what a run wrote: the ``.wandb`` file decoded with W&B's own
protobuf classes (tests/wandb_records.py), the media tables, metrics.jsonl and summary.json.

The 2-rank run sets ``logger.per_rank_keys_max_world_size=1``, so it logs the large-job form
(min / median / max over ranks and a per-rank table); the per-rank-key form is checked on the
function that builds both (tests/test_metrics.py).

Every job here points W&B at a closed localhost port, so nothing can leave the machine even
if some W&B thread tried.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, free_port, run_train
from tests.wandb_records import (
    BLOCK_BYTES,
    CorruptRunFile,
    find_run_files,
    read_records,
    read_run,
)
from train.config import LoggerConfig
from train.progress import Progress
from train.wandb_logger import (
    STEP_KEY,
    WandbRun,
    in_multirun,
    log_exported_model,
    wandb_job_type,
)

BASE = [item for item in TINY if not item.startswith("logger.")]
STEPS = ["trainer.steps=30", "trainer.eval_every=15", "logger.log_every=10"]
# Reports land every log_every steps and at every segment end (warm-up end, evals).
REPORT_STEPS = [10, 15, 20, 30]
TABLES = {"user_id", "user_country", "user_interests", "ad_id", "advertiser_id",
          "ad_category", "hour_of_day", "device_type", "site_id"}
NOTES = "two ranks, row-wise"
# The W&B run of a 2-rank job above the per-rank-key threshold, with checkpoint artifacts.
WANDB_OPTIONS = ["logger.per_rank_keys_max_world_size=1", "logger.log_checkpoints=true",
                 f"logger.notes='{NOTES}'", "checkpoint.every_steps=15"]


def no_network_env(**extra: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", **extra}


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="module")
def two_rank_offline_run(tmp_path_factory):
    """One offline run on 2 gloo ranks under torchrun, shared by the checks below."""
    root = tmp_path_factory.mktemp("offline2")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = run_train(
        [*BASE, *STEPS, *WANDB_OPTIONS, "sharding=row_wise", "logger.mode=offline",
         "logger.project=hashrec-test"],
        cwd=root,
        launcher=[torchrun, "--standalone", "--nproc_per_node", "2"],
        env=no_network_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only(list(root.glob("outputs/*/summary.json"))).parent
    return result, run_dir, json.loads((run_dir / "summary.json").read_text())


def test_rank0_alone_writes_one_offline_run_file(two_rank_offline_run):
    result, run_dir, summary = two_rank_offline_run
    run_file = only(find_run_files(run_dir))
    assert summary["wandb_dir"] == str(run_file.parent)
    run = read_run(run_file)
    assert run.project == "hashrec-test" and run.exit_code == 0
    assert run_file.name == f"run-{run.run_id}.wandb"
    # Rank 1 is quiet: each console line appears once.
    assert result.stdout.count("eval  step      30") == 1
    assert result.stdout.count("sharding plan") == 1


def test_history_has_throughput_and_memory_over_ranks(two_rank_offline_run):
    """Above the threshold: no per-rank keys, min / median / max over ranks, and the per-rank
    figures in one perf/rank_table per report."""
    _, run_dir, summary = two_rank_offline_run
    run_file = only(find_run_files(run_dir))
    run = read_run(run_file)
    train_rows = [row for row in run.history if "train/loss" in row]
    assert [row["_step"] for row in train_rows] == REPORT_STEPS  # step = global step
    assert [row[STEP_KEY] for row in train_rows] == REPORT_STEPS  # the charts' x axis
    planned = summary["embedding_bytes_per_rank"]
    for row in train_rows:
        assert 0 < row["train/loss"] < 5
        assert row["train/lr/embedding"] == pytest.approx(0.05)
        assert row["train/lr/dense"] == pytest.approx(0.05)
        assert row["perf/samples_per_sec"] > 0
        # (W&B flattens a logged table into perf/rank_table/<field> history keys.)
        assert not [key for key in row if "/rank" in key and "rank_table" not in key]
        for key in ("perf/samples_per_sec", "perf/step_seconds", "perf/compute_seconds",
                    "mem/rss_bytes", "mem/peak_rss_bytes"):
            low, middle, high = (row[f"{key}/{stat}"] for stat in ("min", "median", "max"))
            assert 0 < low <= middle <= high
            assert middle == pytest.approx((low + high) / 2)  # two ranks
        assert row["perf/step_seconds/max"] == pytest.approx(row["perf/step_seconds"])
        assert row["mem/rss_bytes/max"] == row["mem/rss_bytes_max"]
        assert row["mem/embedding_planned_bytes/min"] == min(planned)
        assert row["mem/embedding_planned_bytes/max"] == max(planned)
        assert row["mem/embedding_measured_bytes/max"] == max(planned)
        # No GPU here: no CUDA keys rather than zeros.
        assert not any(key.startswith("mem/cuda") for key in row)
        assert row["perf/rank_table/_type"] == "table-file"
    assert train_rows[-1]["train/loss"] == pytest.approx(summary["train_loss"], rel=1e-5)
    # One per-rank table per report: a row per rank with every per-rank figure.
    tables_dir = run_file.parent / "files" / "media" / "table"
    tables = sorted(tables_dir.glob("perf/rank_table_*.table.json"),
                    key=lambda path: int(path.name.split("_")[2]))
    assert len(tables) == len(REPORT_STEPS)
    for path in tables:
        table = json.loads(path.read_text())
        column = {name: index for index, name in enumerate(table["columns"])}
        assert [row[column["rank"]] for row in table["data"]] == [0, 1]
        for rank, row in enumerate(table["data"]):
            step = row[column["perf/step_seconds"]]
            wait = row[column["perf/data_wait_seconds"]]
            # The wait is measured (the pipeline's next() calls are timed: never exactly 0)
            # and is a part of the step; the split itself is checked in
            # test_step_time_split_measures_the_wait_and_the_rest below.
            assert 0 < wait < step and row[column["perf/compute_seconds"]] > 0
            assert row[column["mem/peak_rss_bytes"]] >= row[column["mem/rss_bytes"]]
            # The plan's bytes per rank equal what the rank really holds (weights + state).
            assert row[column["mem/embedding_planned_bytes"]] == planned[rank]
            assert row[column["mem/embedding_measured_bytes"]] == planned[rank]


def test_train_auc_and_ne_cover_the_same_window_as_the_train_loss(two_rank_offline_run):
    """train/ne is the window's log loss over the entropy of its click rate, and the window's
    log loss is what train/loss averages: the same steps of both ranks, or these differ."""
    _, run_dir, _ = two_rank_offline_run
    run = read_run(only(find_run_files(run_dir)))
    train_rows = [row for row in run.history if "train/loss" in row]
    for row in train_rows:
        ctr = row["train/ctr"]
        base_entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
        assert row["train/ne"] * base_entropy == pytest.approx(row["train/loss"], rel=1e-5)
        assert 0 <= row["train/auc"] <= 1 and row["train/calibration"] > 0
    # W&B keeps the best and the last window AUC in the run summary.
    assert run.summary["train/auc"] == {"max": max(run.values("train/auc")),
                                        "last": run.values("train/auc")[-1]}


def test_each_eval_logs_quality_and_hashing(two_rank_offline_run):
    _, run_dir, summary = two_rank_offline_run
    run = read_run(only(find_run_files(run_dir)))
    eval_rows = [row for row in run.history if "eval/auc" in row]
    assert [row["_step"] for row in eval_rows] == [15, 30]
    for row, logged in zip(eval_rows, summary["evals"]):
        assert row["eval/auc"] == pytest.approx(logged["auc"])
        assert row["eval/ne"] == pytest.approx(logged["normalized_entropy"])
        assert row["eval/log_loss"] == pytest.approx(logged["log_loss"])
        # summary.json's evals carry calibration and click rates too.
        assert row["eval/calibration"] == pytest.approx(logged["calibration"])
        assert row["eval/ctr"] == pytest.approx(logged["ctr"])
        assert row["eval/predicted_ctr"] == pytest.approx(logged["predicted_ctr"])
        assert logged["calibration"] == pytest.approx(logged["predicted_ctr"] / logged["ctr"])
        assert 0 < logged["ctr"] < 1
        assert row["eval/bayes_auc"] == pytest.approx(summary["eval_bayes_auc"])
        for feature, entry in summary["hashing"].items():
            assert entry["measured_collision_rate"] is not None
            assert row[f"hash/{feature}/measured_collision_rate"] == pytest.approx(
                entry["measured_collision_rate"]
            )
            assert row[f"hash/{feature}/bytes_saved"] == entry["bytes_saved"]


def test_once_per_run_config_system_tables_and_summary(two_rank_offline_run):
    _, run_dir, summary = two_rank_offline_run
    run_file = only(find_run_files(run_dir))
    run = read_run(run_file)
    assert run.config["trainer"]["steps"] == 30
    assert run.config["sharding"]["preset"] == "row_wise"
    system = run.config["system"]
    assert system["world_size"] == 2 and system["device"] == "cpu"
    assert system["torch"] and system["torchrec"] and system["fbgemm_gpu"]
    # The plan table: one row per table, with type, ranks, rows, dim and bytes.
    tables_dir = run_file.parent / "files" / "media" / "table"
    plan = json.loads(only(list(tables_dir.glob("mem/sharding_plan_*.table.json"))).read_text())
    assert plan["columns"][:6] == ["table", "sharding_type", "ranks", "rows", "dim", "bytes"]
    assert {row[0] for row in plan["data"]} == TABLES
    assert {row[1] for row in plan["data"]} == {"row_wise"}
    assert {row[2] for row in plan["data"]} == {"0,1"}
    assert sum(row[5] for row in plan["data"]) == summary["embedding_bytes"]
    hashing = json.loads(only(list(tables_dir.glob("hash/memory_*.table.json"))).read_text())
    assert {row[0] for row in hashing["data"]} == set(summary["hashing"])
    # The final summary is summary.json's content.
    for key in ("state_digest", "steps", "samples", "embedding_bytes", "world_size"):
        assert run.summary[key] == summary[key]
    assert run.summary["samples_per_sec"] == pytest.approx(summary["samples_per_sec"])


def test_run_is_typed_noted_and_charted_against_the_global_step(two_rank_offline_run):
    _, run_dir, _ = two_rank_offline_run
    run = read_run(only(find_run_files(run_dir)))
    assert run.job_type == "train" and run.notes == NOTES
    # Every key is charted against the global step, itself hidden from the charts.
    assert run.metrics[STEP_KEY]["hidden"]
    assert run.metrics["*"]["step_metric"] == STEP_KEY
    expected = {"eval/auc": {"max", "last"}, "eval/ne": {"min", "last"},
                "eval/log_loss": {"min", "last"}, "train/loss": {"min", "last"}}
    for key, summaries in expected.items():
        assert run.metrics[key] == {"step_metric": STEP_KEY, "hidden": False,
                                    "summary": summaries}
    # W&B's summary keeps those aggregates over the whole history (the runs table sorts by
    # them): the best eval AUC, not only the last.
    aucs, nes = run.values("eval/auc"), run.values("eval/ne")
    assert run.summary["eval/auc"] == {"max": max(aucs), "last": aucs[-1]}
    assert run.summary["eval/ne"] == {"min": min(nes), "last": nes[-1]}


def test_each_kept_checkpoint_is_an_artifact_with_the_config(two_rank_offline_run):
    _, run_dir, _ = two_rank_offline_run
    run = read_run(only(find_run_files(run_dir)))
    artifacts = [artifact for artifact in run.artifacts if artifact.type == "checkpoint"]
    assert [set(artifact.aliases) for artifact in artifacts] == [{"step-15", "latest"},
                                                                 {"step-30", "latest"}]
    for artifact, step in zip(artifacts, (15, 30)):
        assert artifact.name == f"checkpoint-{run.run_id}"
        assert artifact.metadata["step"] == step
        assert artifact.metadata["config"]["trainer"]["steps"] == 30
        assert artifact.metadata["config"]["sharding"]["preset"] == "row_wise"
        # A reference to every file of the checkpoint folder, where it lies.
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        assert sorted(artifact.paths) == sorted(p.name for p in folder.iterdir())
        assert {Path(ref.removeprefix("file://")).parent for ref in artifact.references} == {
            folder.resolve()}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "checkpoint"] == [15, 30]


def test_metrics_jsonl_matches_wandb(two_rank_offline_run):
    _, run_dir, summary = two_rank_offline_run
    run = read_run(only(find_run_files(run_dir)))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [record["kind"] for record in records]
    assert kinds[:2] == ["config", "system"] and kinds[-1] == "summary"
    assert records[-1]["summary"]["state_digest"] == summary["state_digest"]
    local = [r for r in records if r["kind"] == "metrics" and "train/loss" in r]
    assert [r["train/loss"] for r in local] == pytest.approx(run.values("train/loss"))
    assert [r["step"] for r in local] == REPORT_STEPS
    tables = {r["key"]: r for r in records if r["kind"] == "table"}
    assert len(tables["mem/sharding_plan"]["rows"]) == len(TABLES)
    rank_tables = [r for r in records if r["kind"] == "table" and r["key"] == "perf/rank_table"]
    assert [r["step"] for r in rank_tables] == REPORT_STEPS


def test_online_with_unreachable_wandb_trains_and_falls_back_offline(tmp_path):
    result = run_train(
        [*BASE, "trainer.steps=12", "trainer.eval_every=0", "logger.log_every=5",
         "logger.mode=online", "logger.init_timeout_s=3"],
        cwd=tmp_path,
        env=no_network_env(WANDB_API_KEY="x" * 40),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("hashrec: warning:") == 1, result.stderr[-3000:]
    assert "W&B online logging failed" in result.stderr
    summary = json.loads(only(list(tmp_path.glob("outputs/**/summary.json"))).read_text())
    assert summary["steps"] == 12
    # The failed online attempt may leave its own folder; the run continues in an offline
    # one with the same id, which summary.json names.
    run_files = find_run_files(tmp_path)
    run_file = only([p for p in run_files if p.parent.name.startswith("offline-run-")])
    assert summary["wandb_dir"] == str(run_file.parent)
    run = read_run(run_file)
    assert run.values("train/loss") and run.summary["state_digest"] == summary["state_digest"]
    assert run.run_id == (run_file.parents[1] / "hashrec_run_id").read_text().strip()


def test_job_restarted_in_its_run_dir_continues_the_wandb_run(tmp_path):
    """A requeued Slurm job or a resumed torchrun job lands in the same run directory and
    must log to the same W&B run id."""
    run_ids = []
    for steps, resume in ((5, "none"), (8, "auto")):
        result = run_train(
            [*BASE, f"trainer.steps={steps}", f"trainer.resume={resume}", "trainer.eval_every=0",
             "logger.mode=offline", "logger.log_every=1", f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=tmp_path, env=no_network_env(), timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        run_ids.append(json.loads((tmp_path / "run" / "summary.json").read_text())["wandb_dir"])
    files = find_run_files(tmp_path / "run")
    assert len(files) == 2 and len({read_run(path).run_id for path in files}) == 1
    # The plan table: at step 0 in the new run; the resumed session, whose step 0 W&B would
    # drop, puts it in the run summary (no step) with its table file, and logs no step 0.
    first, resumed = (read_run(path) for path in files)
    assert first.history[0]["mem/sharding_plan/_type"] == "table-file"
    assert first.history[0]["_step"] == 0
    assert all(row["_step"] > 5 for row in resumed.history)
    plan = resumed.summary["mem/sharding_plan"]
    assert plan["_type"] == "table-file" and plan["nrows"] == len(TABLES)
    table = json.loads((files[1].parent / "files" / plan["path"]).read_text())
    assert {row[0] for row in table["data"]} == TABLES
    # The resumed session logs the steps after the checkpoint: one history across sessions.
    steps = [[row["_step"] for row in read_run(path).history if "train/loss" in row]
             for path in files]
    assert steps == [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert run_ids[0] != run_ids[1]  # two W&B folders (two sessions), one run id
    jsonl = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["kind"] == "summary" for line in jsonl) == 2  # appended


def test_plan_only_is_a_plan_run_with_its_plan_table(tmp_path):
    result = run_train([*BASE, "plan_only=true", "sharding=row_wise", "logger.mode=offline"],
                       cwd=tmp_path, env=no_network_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_file = only(find_run_files(tmp_path))
    run = read_run(run_file)
    assert run.job_type == "plan" and run.exit_code == 0
    assert run.config["plan_only"] is True and run.summary["world_size"] == 1
    assert [row["_step"] for row in run.history] == [0]  # the plan table, nothing trained
    plan = json.loads(only(list(
        (run_file.parent / "files" / "media" / "table").glob("mem/sharding_plan_*.table.json")
    )).read_text())
    assert {row[0] for row in plan["data"]} == TABLES


def test_job_type_names_plans_sweep_points_and_training(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    from train.compose import CONF_DIR
    from train.config import register_configs

    assert wandb_job_type(plan_only=True, multirun=True) == "plan"
    assert wandb_job_type(plan_only=False, multirun=True) == "sweep_point"
    assert wandb_job_type(plan_only=False, multirun=False) == "train"
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert not in_multirun()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a hydra-submitit-launcher job
    assert in_multirun()
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    # A job of `python -m train -m ...`: Hydra's own config says multirun.
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    for mode, expected in ((RunMode.RUN, False), (RunMode.MULTIRUN, True)):
        with read_write(cfg.hydra):
            cfg.hydra.mode = mode
        HydraConfig.instance().set_config(cfg)
        try:
            assert in_multirun() is expected
        finally:
            HydraConfig.instance().cfg = None


def test_exported_model_hook_logs_a_model_artifact_to_the_trained_run(tmp_path, monkeypatch):
    """The export (another module) calls log_exported_model with its file: the run trained
    in the run directory gets a ``model`` artifact holding the file."""
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    (run_dir / "wandb" / "hashrec_run_id").write_text("trained1\n")
    model = tmp_path / "model.pt"
    model.write_bytes(b"exported weights")
    directory = log_exported_model(LoggerConfig(name="t", mode="offline"), run_dir, model,
                                   {"precision": "fp16"})
    # The export script exits after the hook, which stops W&B's service and its writer (as
    # train/__main__.py does); in this process, do that before reading the run file.
    import wandb

    wandb.teardown()
    run = read_run(only(find_run_files(directory)))
    assert run.run_id == "trained1" and run.job_type == "export"
    [artifact] = [artifact for artifact in run.artifacts if artifact.type == "model"]
    assert artifact.name == "model-trained1" and artifact.aliases == ["latest"]
    assert artifact.paths == ["model.pt"] and artifact.references == [""]  # uploaded
    assert artifact.metadata == {"precision": "fp16"}
    assert log_exported_model(LoggerConfig(name="t", mode="disabled"), run_dir, model, {}) is None


def test_a_wandb_failure_never_raises(tmp_path):
    """The run directory is a file, so W&B cannot even make its folder: one warning, W&B
    off, and every later call is a quiet no-op."""
    blocked = tmp_path / "not_a_directory"
    blocked.write_text("")
    warnings: list[str] = []
    run = WandbRun(LoggerConfig(name="t", mode="offline"), blocked, {}, warn=warnings.append)
    run.log({"train/loss": 0.5}, step=1)
    run.log_table("mem/sharding_plan", ["table"], [["user_id"]], step=1)
    run.update_config({"system": {"world_size": 1}})
    run.finish({"steps": 1})
    assert run.mode == "disabled" and run.directory is None
    assert len(warnings) == 1 and "training goes on" in warnings[0]


def test_disabled_mode_never_imports_wandb(tmp_path):
    """mode=disabled: no W&B import and no W&B files, but metrics.jsonl is still written."""
    code = (
        "import sys; from pathlib import Path\n"
        "from train.config import LoggerConfig\n"
        "from train.metrics_logger import MetricsLogger\n"
        "config = LoggerConfig(name='t', mode='disabled')\n"
        "logger = MetricsLogger(config, Path(sys.argv[1]), True, {})\n"
        "logger.log({'train/loss': 0.5}, step=1); logger.finish({'steps': 1})\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "wandb").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["config", "metrics", "summary"]


def test_reader_verifies_checksums(two_rank_offline_run, tmp_path):
    _, run_dir, _ = two_rank_offline_run
    run_file = only(find_run_files(run_dir))
    data = bytearray(run_file.read_bytes())
    assert len(data) > BLOCK_BYTES  # records cross a block boundary and still decode
    assert sum(1 for _ in read_records(run_file)) > 10
    data[BLOCK_BYTES + 100] ^= 0xFF
    broken = tmp_path / "run-broken.wandb"
    broken.write_bytes(bytes(data))
    with pytest.raises(CorruptRunFile):
        list(read_records(broken))


def test_progress_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(enabled=True, total_steps=100, stream=stream)
    assert not progress.use_bar
    progress.start_training(0)
    progress.advance(50)
    progress.report(50, loss=0.5, samples_per_sec=1234.0, lr=0.05)
    progress.write("eval  step      50")
    progress.close()
    assert stream.getvalue().splitlines() == [
        "step      50/100  loss 0.5000  1,234 samples/s  lr 0.05",
        "eval  step      50",
    ]


def test_progress_bar_on_a_terminal_and_silence_elsewhere():
    stream = io.StringIO()
    progress = Progress(enabled=True, total_steps=100, use_bar=True, stream=stream)
    progress.start_training(0)
    progress.advance(100)
    progress.report(100, loss=0.25, samples_per_sec=999.0, lr=0.05)
    progress.close()
    assert "100/100" in stream.getvalue() and "loss 0.2500" in stream.getvalue()
    quiet = io.StringIO()
    other_rank = Progress(enabled=False, total_steps=100, stream=quiet)
    other_rank.report(10, loss=0.5, samples_per_sec=1.0, lr=0.1)
    other_rank.write("x")
    assert quiet.getvalue() == ""


def test_step_time_split_measures_the_wait_and_the_rest():
    """A batch that takes 50 ms to make and a step body of 10 ms: the per-rank figures say
    so, not the other way round, and not all wait or all compute (sleeps only overshoot)."""
    import time

    import torch

    from train.step_stats import RANK_FIGURES, TimedIterator, Window, rank_figures

    def slow_batches():
        while True:
            time.sleep(0.05)
            yield None

    batches = TimedIterator(slow_batches())
    window = Window.open(0, batches)
    num_steps = 4
    for _ in range(num_steps):
        next(batches)
        time.sleep(0.01)  # forward, backward, optimizer
    figures = rank_figures(window, num_steps, batches, torch.tensor(0.5), 8, torch.device("cpu"))
    figure = dict(zip(RANK_FIGURES, figures.tolist()))
    assert 0.05 <= figure["data_wait_seconds"] < 0.08
    assert 0.01 <= figure["compute_seconds"] < 0.04
    assert figure["step_seconds"] >= 0.06
