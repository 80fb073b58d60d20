"""scripts/export.py and scripts/predict.py: the exported model scores as the trained one did.

Runs once per module (fixtures): a 2-rank row-wise torchrun job whose features use every
hashing method at once, one short single-process job per conf/hashing/*.yaml, and a short job
on the shipped Criteo sample. The training model's own scores come from the training code:
the sharded model rebuilt on 2 gloo ranks and resumed from the checkpoint (2-rank job), or the
unsharded model loaded from it (1-process jobs); the run's summary.json gives its eval AUC.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from modules.metrics import auc, log_loss
from modules.serving.inputs import batch_inputs
from modules.serving.schema import load_exported
from tests.helpers import REPO, TINY, compose_config, run_ranks, run_train
from train.build import feature_groups

# Trains 8 jobs (a torchrun one among them) and runs the scripts in subprocesses.
pytestmark = pytest.mark.slow

HASHING_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "hashing").glob("*.yaml"))
STEPS = 4
# Every method in one model: user_id hash embeddings with importance weights, ad_id QR,
# advertiser_id frequency, site_id managed, ad_category modulo, user_country in the user
# group's shared table, user_interests hash (4 IDs per sample), the small features none.
MIXED = [
    "+hashing.features.user_id={method:multi_hash,importance_rows:16}",
    "+hashing.features.ad_id=qr",
    "+hashing.features.advertiser_id=frequency",
    "+hashing.features.site_id=managed",
    "+hashing.features.ad_category=modulo",
    "+hashing.features.user_country=shared",
]
SHORT = [*TINY, f"trainer.steps={STEPS}", f"trainer.eval_every={STEPS}"]
EXPORT = [sys.executable, str(REPO / "scripts" / "export.py")]
PREDICT = [sys.executable, str(REPO / "scripts" / "predict.py")]


def frequency_file(path: Path) -> Path:
    """Frequent IDs for every TINY feature (a few of the planted data's small IDs)."""
    names = ["user_id", "user_country", "user_interests", "ad_id", "advertiser_id",
             "ad_category", "hour_of_day", "device_type", "site_id"]
    torch.save({"ids": {name: torch.arange(5, dtype=torch.int64) for name in names},
                "counts": {}, "meta": {}}, path)
    return path


def run_script(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                               "OMP_NUM_THREADS": "1"})


def export(run_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_script([*EXPORT, str(run_dir), str(out), *extra], run_dir.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def composed(overrides: list[str]):
    """The DictConfig ``python -m train overrides`` composes."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def planted_eval(run_dir: Path, overrides: list[str], world_size: int):
    """The run's eval batches, rank after rank, as its evaluation gathered them."""
    from train.data import planted_data

    config = compose_config(overrides)
    data = planted_data(config, feature_groups(config.features, config.hashing))
    return [data.batch("eval", rank, step)[0]
            for rank in range(world_size) for step in range(config.data.eval_batches)]


def exported_scores(path: Path, batches) -> torch.Tensor:
    model, _ = load_exported(str(path))
    with torch.no_grad():
        return torch.cat([model(*batch_inputs(batch)) for batch in batches])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_rank")
    overrides = [*SHORT, *MIXED, f"hashing.frequency_file={frequency_file(root / 'f.pt')}",
                 "sharding=row_wise"]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = run_train([*overrides, f"hydra.run.dir={root}/run"], cwd=root,
                       launcher=[torchrun, "--standalone", "--nproc_per_node", "2"],
                       env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    export(root / "run", root / "model.pt")
    return root, overrides


def _sharded_scores(rank: int, world_size: int, run_dir: str, out: str) -> None:
    """The trained model as training holds it: sharded over the ranks, resumed from its
    checkpoint by the training code, scoring this rank's eval batches."""
    from train.build import build_sharded_job
    from train.checkpoint import choose_checkpoint, load_checkpoint
    from train.data import planted_data
    from train.distributed import DistributedContext
    from train.export import load_run_config, _groups

    config, _ = load_run_config(Path(run_dir))
    groups = _groups(config, Path(run_dir))
    context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    job = build_sharded_job(config, groups, context)
    load_checkpoint(choose_checkpoint("auto", Path(run_dir)), job.model, job.optimizer)
    job.model.eval()
    data = planted_data(config, groups)
    with torch.no_grad():
        logits = [job.model(data.batch("eval", rank, step)[0])[1][1]
                  for step in range(config.data.eval_batches)]
    torch.save(torch.cat(logits), f"{out}.{rank}")


def test_two_rank_row_wise_export_scores_as_the_sharded_model(two_rank_run):
    root, overrides = two_rank_run
    _, schema = load_exported(str(root / "model.pt"))
    methods = {feature["method"] for feature in schema["features"]}
    configured = {compose_config([f"hashing={name}"]).hashing.method for name in HASHING_CONFIGS}
    assert configured <= methods, f"methods without a 2-rank check: {configured - methods}"
    run_ranks(_sharded_scores, 2, str(root / "run"), str(root / "reference"))
    reference = torch.sigmoid(torch.cat([torch.load(f"{root}/reference.{r}") for r in (0, 1)]))
    batches = planted_eval(root / "run", overrides, 2)
    scores = exported_scores(root / "model.pt", batches)
    assert (scores - reference).abs().max() < 1e-5
    labels = torch.cat([batch.labels for batch in batches])
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert auc(scores, labels) == pytest.approx(summary["eval_auc"], abs=1e-9)
    assert log_loss(torch.logit(scores.double()), labels) == pytest.approx(
        summary["eval_log_loss"], abs=1e-6)


@pytest.mark.parametrize("hashing", HASHING_CONFIGS)
def test_each_hashing_config_exports_the_trained_scores(hashing, tmp_path):
    from train.export import _groups, find_checkpoint, gather, load_run_config
    from train.export import export as export_in_process
    from train.run import run

    overrides = [*SHORT, f"hashing={hashing}",
                 # ID spaces small enough that QR's remainder tables stay small (1e9 / 64 rows
                 # would give user_id 15.6M of them).
                 "features.groups.user.features.user_id.id_space=100000",
                 "features.groups.ad.features.ad_id.id_space=100000",
                 f"hashing.frequency_file={frequency_file(tmp_path / 'f.pt')}"]
    cfg = composed(overrides)
    # As python -m train: the job writes the composed config into the run's .hydra folder.
    saved_environment = dict(os.environ)
    try:
        summary = run(cfg, tmp_path / "run", {"config.yaml": OmegaConf.to_yaml(cfg)})
    finally:
        # run() sets MASTER_ADDR / MASTER_PORT for its one-process group; a later job
        # started from this process must not inherit a port this one may still hold.
        os.environ.clear()
        os.environ.update(saved_environment)
    export_in_process(tmp_path / "run", tmp_path / "model.pt")  # the CLI has tests below
    batches = planted_eval(tmp_path / "run", overrides, 1)
    scores = exported_scores(tmp_path / "model.pt", batches)
    config, _ = load_run_config(tmp_path / "run")
    groups = _groups(config, tmp_path / "run")
    model, _, _ = gather(config, groups, find_checkpoint(tmp_path / "run")[1])
    with torch.no_grad():
        reference = torch.sigmoid(torch.cat([model.eval()(batch) for batch in batches]))
    assert (scores - reference).abs().max() < 1e-5
    labels = torch.cat([batch.labels for batch in batches])
    assert auc(scores, labels) == pytest.approx(summary["eval_auc"], abs=1e-9)


CRITEO = ["experiment=criteo_sample", "hashing.compression_ratio=1000",
          "features.embedding_dim=8", "trainer.steps=20", "trainer.eval_every=20",
          "logger.mode=disabled", "trainer.precision=fp32"]
DEV = REPO / "data" / "criteo_sample" / "dev.tsv"
# fp16 and int8 tables against fp32 on the 409 dev rows (2026-11-30): AUC moved by < 0.001
# (fp16) and < 0.002 (int8); the margin leaves room for another machine's rounding.
QUANTIZED_AUC_MARGIN = 0.005


@pytest.fixture(scope="module")
def criteo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("criteo")
    result = run_train([*CRITEO, f"hydra.run.dir={root}/run"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    for precision in ("fp32", "fp16", "int8"):
        export(root / "run", root / f"{precision}.pt", "--precision", precision)
    return root


def test_predict_on_the_eval_split_gives_the_runs_eval_auc(criteo_run):
    root = criteo_run
    summary = json.loads((root / "run" / "summary.json").read_text())
    aucs = {}
    for precision in ("fp32", "fp16", "int8"):
        out = root / f"{precision}.parquet"
        result = run_script([*PREDICT, str(root / f"{precision}.pt"), str(DEV), str(out),
                             "--batch-size", "100"], root)
        assert result.returncode == 0, result.stderr[-2000:]
        table = pq.read_table(out)
        assert table.column_names == ["score", "label"] and table.num_rows == 409
        labels = [int(line.split("\t")[0]) for line in DEV.read_text().splitlines()]
        assert table.column("label").to_pylist() == labels  # input order
        aucs[precision] = auc(torch.tensor(table.column("score").to_pylist()),
                              torch.tensor(labels, dtype=torch.float64))
        assert f"auc {aucs[precision]:.4f}" in result.stdout
    assert aucs["fp32"] == pytest.approx(summary["eval_auc"], abs=1e-6)
    for precision in ("fp16", "int8"):
        assert abs(aucs[precision] - aucs["fp32"]) < QUANTIZED_AUC_MARGIN, aucs
    sizes = {p: load_exported(str(root / f"{p}.pt"))[1]["table_bytes"] for p in aucs}
    assert sizes["fp16"] < sizes["fp32"] and sizes["int8"] <= sizes["fp16"]


def test_exported_file_loads_without_hashrec_or_hydra(criteo_run, tmp_path):
    loader = tmp_path / "load.py"
    loader.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('modules', 'train', 'hydra', 'omegaconf'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import json, torch, fbgemm_gpu\n"
        "extra = {'hashrec/schema.json': ''}\n"
        "model = torch.jit.load(sys.argv[1], _extra_files=extra)\n"
        "schema = json.loads(extra['hashrec/schema.json'])\n"
        "num_features, batch = len(schema['features']), 3\n"
        "scores = model(torch.rand(batch, len(schema['dense_columns'])),\n"
        "               torch.arange(num_features * batch) * 7919,\n"
        "               torch.ones(num_features * batch, dtype=torch.int32))\n"
        "assert scores.shape == (batch,) and bool(((scores > 0) & (scores < 1)).all())\n"
        "print('ok', schema['precision'])\n"
    )
    for precision in ("fp32", "int8"):
        result = subprocess.run([sys.executable, str(loader), str(criteo_run / f"{precision}.pt")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"ok {precision}" in result.stdout


def test_unexportable_checkpoint_is_one_line_and_writes_nothing(criteo_run, tmp_path):
    checkpoint = next((criteo_run / "run" / "checkpoints").glob("step_*"))
    broken_run = tmp_path / "run"
    shutil.copytree(criteo_run / "run", broken_run)
    broken = broken_run / "checkpoints" / checkpoint.name
    (broken / "meta.json").unlink()
    out = tmp_path / "model.pt"
    result = run_script([*EXPORT, str(broken), str(out)], tmp_path)
    assert result.returncode != 0 and not out.exists()
    assert result.stderr.strip().count("\n") == 0 and "no meta.json" in result.stderr
    # A table the run's config has, missing from the checkpoint.
    shutil.copy(checkpoint / "meta.json", broken / "meta.json")
    meta = json.loads((broken / "meta.json").read_text())
    del meta["tables"]["C3"]
    (broken / "meta.json").write_text(json.dumps(meta))
    result = run_script([*EXPORT, str(broken), str(out)], tmp_path)
    assert result.returncode != 0 and not out.exists()
    assert result.stderr.strip().count("\n") == 0 and "no table C3" in result.stderr
    assert list(tmp_path.glob(".model.pt.tmp*")) == []


def test_bad_row_fails_with_file_and_line_or_is_skipped(criteo_run, tmp_path):
    lines = DEV.read_text().splitlines()
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join([*lines[:5], "1\tnot a row", *lines[5:10]]) + "\n")
    out = tmp_path / "out.parquet"
    model = str(criteo_run / "fp32.pt")
    result = run_script([*PREDICT, model, str(bad), str(out), "--batch-size", "4"], tmp_path)
    assert result.returncode != 0 and not out.exists()
    assert result.stderr.strip().count("\n") == 0 and f"{bad}:6:" in result.stderr
    result = run_script([*PREDICT, model, str(bad), str(out), "--on-bad-row", "skip"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 1 bad rows" in result.stdout and pq.read_table(out).num_rows == 10


def test_export_logs_the_file_as_a_model_artifact_of_the_run(criteo_run, tmp_path):
    """scripts/export.py hands its file to W&B as a ``model`` artifact of the run that
    trained it (in the run's logger mode: offline here), so a W&B user finds the model."""
    from tests.wandb_records import find_run_files, read_run

    run_dir = tmp_path / "run"
    shutil.copytree(criteo_run / "run", run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    config = OmegaConf.load(config_path)
    config.logger.mode = "offline"
    OmegaConf.save(config, config_path)
    result = export(run_dir, tmp_path / "model.pt")
    assert "W&B: logged as a model artifact of the run" in result.stdout, result.stderr[-2000:]
    [run_file] = find_run_files(run_dir / "wandb")
    run = read_run(run_file)
    assert run.job_type == "export"
    [artifact] = [artifact for artifact in run.artifacts if artifact.type == "model"]
    assert artifact.paths == ["model.pt"] and artifact.metadata["precision"] == "fp32"
    assert export(run_dir, tmp_path / "again.pt", "--no-wandb").stdout.count("W&B") == 0
