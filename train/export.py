"""Export a trained run as one self-contained TorchScript file (``scripts/export.py``).

    run dir or checkpoint ─► the run's config (.hydra/config.yaml) ─► unsharded model on CPU
        ─► torch.distributed.checkpoint loads the shards of any world size into it (no process
           group: one process reads every rank's files) ─► hashing fingerprints checked
        ─► ServingModel (modules/serving/) ─► fx trace + script ─► .<out>.tmp ─► rename

The ID mappers' salts and moduli are not in the checkpoint (non-persistent buffers): they are
rebuilt from the run's config, and the fingerprint of every feature's mapping recorded in
``meta.json`` must match the rebuilt one, so a config edited since training cannot slip a
different hashing into the export. Frequency lists and managed-collision maps are model state
and come from the checkpoint. Fused optimizer state is not read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from modules.criteo import CATEGORICAL_NAMES, NUM_DENSE
from modules.embeddings import table_configs
from modules.features import FeatureGroupSpec, all_features
from modules.hash_combine import PooledCombiner
from modules.managed_collisions import MANAGED_INPUT_SPACE
from modules.model import ClickModel, DotInteraction
from modules.serving.mapping import FrequentRows, ManagedMap, ServingIdMapping
from modules.serving.model import (
    PlainDotInteraction,
    ServingModel,
    quantized_tables,
    table_bytes,
    to_torchscript,
)
from modules.serving.schema import FORMAT, SCHEMA_FILE
from train.build import build_click_model, feature_groups
from train.checkpoint import META, check_intact, checkpoint_root, complete_checkpoints
from train.config import Config, register_configs
from train.hashing.budget import budget_facts
from train.hashing.fingerprint import first_difference, hashing_fingerprints
from train.parquet_features import (
    STATISTICS_FILE,
    derived_features,
    derives_features,
    fill_columns_from_statistics,
    needs_statistics,
)
from train.run import to_config
from train.tables import table_name_of

_ID_ROWS = 6  # salt, hashes, m1, d, m2, offset: the rows of id_mapping's table serving uses


class ExportError(Exception):
    """A run or checkpoint that cannot be exported; the message is one line naming why."""


@dataclass
class Exported:
    path: Path
    file_bytes: int
    table_bytes: int
    checkpoint: Path
    step: int
    world_size: int


def find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run directory (its latest intact checkpoint) or a
    checkpoint directory (``<run dir>/checkpoints/step_<N>``)."""
    if not path.exists():
        raise ExportError(f"{path}: no such run or checkpoint directory")
    is_checkpoint = (path / META).exists() or (path / ".metadata").exists()
    if path.parent.name == "checkpoints" or is_checkpoint:
        problem = check_intact(path)
        if problem is not None:
            raise ExportError(f"checkpoint {path} cannot be exported: {problem}")
        if not (path / ".metadata").exists():
            raise ExportError(f"checkpoint {path} cannot be exported: no .metadata "
                              f"(not a torch.distributed.checkpoint folder)")
        return path.parent.parent, path
    root = checkpoint_root(path)
    found = complete_checkpoints(root)
    for info in reversed(found):
        if check_intact(info.path) is None:
            return path, info.path
    raise ExportError(
        f"{path}: no complete checkpoint under {root} (a run writes one at its end with "
        f"checkpoint.at_end=true)"
    )


def load_run_config(run_dir: Path) -> tuple[Config, str]:
    """The run's composed config (as its job wrote it), checked against the schema, and its
    text."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        raise ExportError(f"{run_dir}: no .hydra/config.yaml (the config the run was trained with)")
    register_configs()
    text = path.read_text()
    schema = OmegaConf.structured(Config)
    try:
        return to_config(OmegaConf.merge(schema, OmegaConf.load(path))), text
    except Exception as error:  # an OmegaConf/schema error: one line
        raise ExportError(f"{path}: {str(error).splitlines()[0]}") from None


def run_statistics(config: Config, run_dir: Path) -> dict | None:
    """The Parquet statistics the run measured once (``data_statistics.json``), never
    measured again, where its config needs them; with them the run's columns (when it read
    them off the train files) and, for ``features=from_data``, its derived feature set are
    put back into ``config`` exactly as training built them (``train/parquet_features.py``)."""
    if not needs_statistics(config):
        return None
    path = run_dir / STATISTICS_FILE
    if not path.exists():
        raise ExportError(
            f"{run_dir}: no {STATISTICS_FILE} (the statistics a data=parquet run measures and "
            f"derives its features and dense normalisation from)"
        )
    statistics = json.loads(path.read_text())
    fill_columns_from_statistics(config, statistics)
    if derives_features(config):
        try:
            config.features = derived_features(config, statistics)
        except (KeyError, ValueError) as error:
            raise ExportError(f"{path}: cannot derive the run's features ({error})") from None
    return statistics


def _groups(config: Config, run_dir: Path, world_size: int = 1) -> list[FeatureGroupSpec]:
    """Feature groups as training built them on ``world_size`` ranks (derived from the saved
    statistics for features=from_data). A relative frequency file is looked for from here,
    then from the run directory and its parents (training's working directory)."""
    run_statistics(config, run_dir)
    frequency_file = config.hashing.frequency_file
    relative = frequency_file and not Path(frequency_file).is_absolute()
    if relative and not Path(frequency_file).exists():
        for base in [run_dir, *run_dir.resolve().parents]:
            if (base / frequency_file).exists():
                config.hashing.frequency_file = str(base / frequency_file)
                break
    try:
        # A hashing budget per rank sized the tables for the world size trained on.
        return feature_groups(config.features, config.hashing, budget_facts(config, world_size))
    except ValueError as error:
        raise ExportError(str(error)) from None


def gather(
    config: Config, groups: list[FeatureGroupSpec], checkpoint: Path
) -> tuple[ClickModel, dict, dict]:
    """The unsharded model with the checkpoint's state, (model, meta.json, DCP metadata)."""
    meta = json.loads((checkpoint / META).read_text())
    world_size = int(meta.get("world_size", 1))
    # Managed tables: built for the world size they were trained on (their maps' bucketing).
    model = build_click_model(config, groups, torch.device("cpu"), world_size)
    saved_tables = meta.get("tables", {})
    state = model.state_dict()
    ours = {table_name_of(key): list(value.shape) for key, value in state.items()}
    ours.pop(None, None)
    for name in sorted(set(ours) | set(saved_tables)):
        if name not in saved_tables:
            raise ExportError(
                f"checkpoint {checkpoint} has no table {name}, which the run's config has")
        if name not in ours:
            raise ExportError(
                f"checkpoint {checkpoint} has table {name}, which the run's config lacks")
        if saved_tables[name] != ours[name]:
            raise ExportError(
                f"checkpoint {checkpoint}: table {name} is {saved_tables[name]}, the run's "
                f"config makes it {ours[name]}"
            )
    if "hashing" not in meta:
        raise ExportError(f"checkpoint {checkpoint}: meta.json has no hashing fingerprints "
                          f"(written before hashrec recorded them); cannot check the ID mapping")
    feature = first_difference(meta["hashing"], hashing_fingerprints(model))
    if feature is not None:
        raise ExportError(
            f"checkpoint {checkpoint}: feature {feature} maps IDs otherwise than the run's "
            f"config rebuilds (method, seed or sizes differ)"
        )
    reader = dcp.FileSystemReader(str(checkpoint))
    metadata = reader.read_metadata().state_dict_metadata
    missing = [key for key in state if f"model.{key}" not in metadata]
    if missing:
        raise ExportError(f"checkpoint {checkpoint} lacks {missing[0]}" +
                          (f" and {len(missing) - 1} more entries" if len(missing) > 1 else ""))
    try:
        # No process group: this one process reads every rank's shards into whole tensors.
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"cannot read checkpoint {checkpoint}: {first_line}") from None
    return model.model, meta, metadata


def _managed_map(module, group_name: str, table: str, metadata: dict) -> ManagedMap:
    """A managed table's map, merged over the shards it was trained on, and each shard's last
    row (the row its IDs outside the map share)."""
    key = (f"model.model.embedding_groups.{group_name}.managed_collection."
           f"_managed_collision_collection._managed_collision_modules.{table}."
           f"_mch_remapped_ids_mapping")
    chunks = getattr(metadata[key], "chunks", None)
    if chunks:
        bounds = sorted((int(c.offsets[0]), int(c.sizes[0])) for c in chunks)
    else:  # saved as one plain tensor
        bounds = [(0, int(module._mch_remapped_ids_mapping.numel()))]
    num_shards = module.buckets()
    if len(bounds) != num_shards:
        raise ExportError(f"managed table {table}: {len(bounds)} shards in the checkpoint, "
                          f"{num_shards} in meta.json's world size")
    order = torch.argsort(module._mch_sorted_raw_ids, stable=True)
    return ManagedMap(
        sorted_ids=module._mch_sorted_raw_ids[order].clone(),
        rows=module._mch_remapped_ids_mapping[order].clone(),
        fallback_rows=torch.tensor([start + size - 1 for start, size in bounds], dtype=torch.int64),
        block_size=math.ceil(module.input_size() / num_shards),
    )


def serving_model(
    model: ClickModel, groups: list[FeatureGroupSpec], metadata: dict, precision: str
) -> tuple[ServingModel, int]:
    """The trained model as a ServingModel (and its table bytes)."""
    source: list[int] = []
    output_keys: list[str] = []
    columns: list[torch.Tensor] = []
    frequent: dict[int, FrequentRows] = {}
    managed: dict[int, ManagedMap] = {}
    first_feature = 0
    for group in groups:
        embedding_group = model.embedding_groups[group.name]
        for mapper in (embedding_group.id_mapper, embedding_group.managed_id_mapper):
            if mapper is None:
                continue
            offset = len(output_keys)
            output_keys += mapper.output_keys
            source += [first_feature + index for index in mapper.source_index]
            columns.append(mapper.key_parameters[:_ID_ROWS])
            for key_index in mapper.frequency_keys:
                frequent[offset + key_index] = FrequentRows(
                    getattr(mapper, f"frequent_ids_{key_index}").clone(),
                    getattr(mapper, f"frequent_rows_{key_index}").clone(),
                )
            if mapper is embedding_group.managed_id_mapper:
                modules = embedding_group.managed_collection._managed_collision_collection
                for key_index, key in enumerate(mapper.output_keys):
                    managed[offset + key_index] = _managed_map(
                        modules._managed_collision_modules[key], group.name, key, metadata
                    )
        first_feature += len(group.features)
    weights = {
        table_name_of(key): value
        for key, value in model.state_dict().items()
        if table_name_of(key) is not None
    }
    configs = [config for group in groups for config in table_configs(group)]
    lookup = quantized_tables(configs, weights, precision)
    if isinstance(model.interaction, DotInteraction):
        interaction: torch.nn.Module = PlainDotInteraction(model.interaction.pair_indices)
    else:
        interaction = model.interaction
    mapping = ServingIdMapping(
        sum(len(group.features) for group in groups), source, torch.cat(columns, dim=1),
        frequent, managed,
    )
    serving = ServingModel(
        mapping, lookup, output_keys, PooledCombiner(all_features(groups)),
        model.dense_arch, interaction, model.over_arch,
        constant_dense=model.num_dense_features == 0,
    )
    return serving.eval(), table_bytes(lookup)


def _parquet_columns(config: Config, statistics: dict | None) -> dict:
    """A Parquet model's column rules, as its training reader applied them: dense nulls,
    the dense transform with the statistics it used, which categorical columns are lists."""
    data = config.data
    measured = (statistics or {}).get("dense", {})
    categorical = (statistics or {}).get("categorical", {})
    return {
        "dense_null": data.dense_null,
        "dense_statistics": {name: {"mean": measured[name]["mean"], "std": measured[name]["std"]}
                             for name in data.dense_columns if name in measured},
        # None: not measured (a feature YAML without statistics); the file's types decide.
        "list_columns": ([name for name in data.categorical_columns
                          if categorical.get(name, {}).get("list")] if categorical else None),
    }


def schema(config: Config, groups: list[FeatureGroupSpec], config_text: str, meta: dict,
           checkpoint: Path, precision: str, tables: int, statistics: dict | None = None) -> dict:
    """What a server (and scripts/predict.py) needs to feed the model, as JSON."""
    data = config.data
    if data.source == "criteo":
        dense_columns = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
    elif data.source == "parquet":
        dense_columns = list(data.dense_columns)
    else:  # planted data: dense features have no names; Parquet input names them so
        dense_columns = [f"dense_{i}" for i in range(config.features.num_dense_features)]
    features = [
        {
            "name": feature.name,
            "group": group.name,
            "method": feature.hashing.method,
            "num_embeddings": feature.num_embeddings,
            "id_space": feature.id_space,
            "ids_per_sample": feature.ids_per_sample,
        }
        for group in groups
        for feature in group.features
    ]
    return {
        "format": FORMAT,
        "forward": "forward(dense float32 [B, N], values int64 [sum(lengths)], lengths int32 "
                   "[F * B], key-major in feature order) -> click probability float32 [B]",
        "features": features,
        "dense_columns": dense_columns,
        "label_column": data.label_column if data.source == "parquet" else "label",
        "data_source": data.source,
        "criteo_categorical_columns": CATEGORICAL_NAMES if data.source == "criteo" else None,
        # Parquet: data.dense_transform (none | log = log1p(max(x, 0)) | standardize).
        "dense_transform": ("log1p(max(x, 0))" if data.source == "criteo" else
                            data.dense_transform if data.source == "parquet" else "none"),
        "parquet": _parquet_columns(config, statistics) if data.source == "parquet" else None,
        "precision": precision,
        "table_bytes": tables,
        "model": {"interaction": config.model.interaction,
                  "trained_dense_precision": config.trainer.precision},
        "config_fingerprint": hashlib.sha256(config_text.encode()).hexdigest()[:16],
        "hashing_fingerprints": meta.get("hashing", {}),
        "checkpoint": {"path": str(checkpoint), "step": meta.get("step"),
                       "world_size": meta.get("world_size"), "run_id": meta.get("run_id")},
    }


def export(source: Path, out: Path, precision: str = "fp32") -> Exported:
    """Export ``source`` (run or checkpoint directory) to ``out``; nothing is left at ``out``
    (or beside it) when this fails."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    run_dir, checkpoint = find_checkpoint(source)
    config, config_text = load_run_config(run_dir)
    trained_on = int(json.loads((checkpoint / META).read_text()).get("world_size", 1))
    groups = _groups(config, run_dir, trained_on)
    model, meta, metadata = gather(config, groups, checkpoint)
    with torch.no_grad():
        serving, tables = serving_model(model, groups, metadata, precision)
        scripted = to_torchscript(serving)
    described = schema(config, groups, config_text, meta, checkpoint, precision, tables,
                       run_statistics(config, run_dir))
    if not out.parent.exists():
        raise ExportError(f"{out.parent}: no such directory for the output file")
    temporary = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        torch.jit.save(scripted, str(temporary),
                       _extra_files={SCHEMA_FILE: json.dumps(described, indent=1)})
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return Exported(out, out.stat().st_size, tables, checkpoint, int(meta.get("step", 0)),
                    int(meta.get("world_size", 1)))
