"""Distributed checkpoints: written atomically, kept K deep, found again on resume.

Layout under ``<run dir>/checkpoints/``::

    step_00000400/            a complete checkpoint (only ever appears whole)
        .metadata, *.distcp   torch.distributed.checkpoint files (every rank writes its shards)
        rank_00000.pt ...     per-rank extras: RNG states
        meta.json             step, world size, table shapes, file sizes; written last
    step_00000500.partial/    a checkpoint being written
    step_00000500.replaced/   the older checkpoint of a step being written again, set aside
    step_00000100.pruned/     an old checkpoint being deleted

Atomicity: all ranks write into ``*.partial``; after every rank has finished (a collective),
rank 0 writes ``meta.json`` (atomically) and renames the folder. A save cut short at any point
leaves a state that ``resume=auto`` recovers from without losing anything newer
(``recover_interrupted_saves``): a ``.partial`` without ``meta.json`` is deleted (the previous
checkpoint is the latest), one with an intact ``meta.json`` is complete and takes its step's
place, a ``.replaced`` is deleted once its step's new checkpoint is in place (restored
otherwise), and a ``.pruned`` is deleted. On resume, a checkpoint whose files do not match the
sizes in its ``meta.json`` (a truncated copy, a damaged disk) is named, skipped, and the
previous complete one is used instead.

Sharded tables and their fused optimizer state are ShardedTensors, which
torch.distributed.checkpoint reshards on load: a checkpoint written by 2 ranks row-wise loads
into 1 rank table-wise.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from train.collectives import barrier, first_error, on_rank_zero
from train.hashing.fingerprint import first_difference, hashing_fingerprints
from train.tables import table_name_of

CHECKPOINT_DIR = "checkpoints"
META = "meta.json"
# Which run the checkpoints folder belongs to (a uuid made at a fresh start, kept by every
# resume; train/run_dir.py start_checkpoints). Each checkpoint's meta.json records it too, and
# pruning and resume=auto pass over checkpoints of another run.
RUN_ID = "run_id"
PARTIAL = ".partial"
REPLACED = ".replaced"
PRUNED = ".pruned"
# step_<N> and its transient forms; anything else in the folder is left alone.
_ENTRY = re.compile(r"step_(\d+)(\.partial|\.replaced|\.pruned)?")

# Test-only fault hook: HASHREC_CHECKPOINT_FAULT=<point> or <point>@<step> makes the process
# exit at once (os._exit, as a killed process would: no cleanup, no finally) when a save
# reaches that point, so tests can check that every crash point is recovered from. Points, in
# the order a save reaches them: after_shards (every rank), after_meta, between_renames (a
# same-step checkpoint set aside, the new one still .partial), after_renames, while_pruning.
# HASHREC_CHECKPOINT_FAULT_RANK=<r> limits it to rank r (one rank of a job dying mid-save).
FAULT_ENV = "HASHREC_CHECKPOINT_FAULT"
FAULT_RANK_ENV = "HASHREC_CHECKPOINT_FAULT_RANK"
FAULT_EXIT_CODE = 86


class CheckpointError(Exception):
    """A checkpoint that cannot be written or used; the message names it."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _fault(point: str, step: int) -> None:
    wanted = os.environ.get(FAULT_ENV)
    rank = os.environ.get(FAULT_RANK_ENV)
    if rank is not None and dist.is_initialized() and int(rank) != dist.get_rank():
        return
    if wanted in (point, f"{point}@{step}"):
        print(f"hashrec: test fault: exiting at checkpoint point {point} (step {step})",
              file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT_CODE)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def table_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Full (unsharded) shape of every table, for the compatibility check on resume."""
    shapes = {}
    for key, value in model.state_dict().items():
        name = table_name_of(key)
        if name is not None:
            shapes[name] = list(value.size())
    return shapes


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _file_sizes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != META}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    keep: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` (a collective: every rank calls it).

    Raises CheckpointError (on every rank) when any rank fails to write, after removing
    the partial folder: nothing half-written is left behind.
    """
    root = checkpoint_root(run_dir)
    final = step_dir(root, step)
    partial = final.with_name(final.name + PARTIAL)
    hashing = hashing_fingerprints(model)  # on every rank: mappers hold device buffers
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = None
    try:
        if _is_main():
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        barrier()
        dcp.save(_app_state(model, optimizer), checkpoint_id=str(partial))
        torch.save({"rng": torch.get_rng_state(), **(extra or {})}, partial / f"rank_{rank:05d}.pt")
        _fault("after_shards", step)
    except (Exception, CheckpointException) as caught:  # any failure must reach every rank
        error = _explain(caught, root)
    error = first_error(error)
    if error is None and _is_main():
        try:
            meta = {
                "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "tables": table_shapes(model),
                "hashing": hashing,
                "files": _file_sizes(partial),
                "run_id": folder_run_id(root),
            }
            # Written whole or not at all: a meta.json marks the folder complete.
            temporary = partial / (META + ".tmp")
            temporary.write_text(json.dumps(meta, indent=1))
            os.replace(temporary, partial / META)
            _fault("after_meta", step)
            # A step saved again (a resume at the last step saves it once more): the new state
            # replaces the old, set aside first as rename cannot replace a non-empty folder.
            replaced = final.with_name(final.name + REPLACED)
            if final.exists():
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
                _fault("between_renames", step)
            os.replace(partial, final)
            _fsync_dir(root)
            _fault("after_renames", step)
            shutil.rmtree(replaced, ignore_errors=True)
        except OSError as caught:
            error = f"{type(caught).__name__}: {caught}"
    error = first_error(error)
    if error is not None:
        if _is_main():
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        raise CheckpointError(f"cannot write checkpoint {final}: {error}")
    if _is_main():
        _prune(root, keep, step)
    barrier()
    return final


def folder_run_id(root: Path) -> str | None:
    """The run the checkpoints folder belongs to; None for a folder from before run ids."""
    try:
        return (root / RUN_ID).read_text().strip() or None
    except FileNotFoundError:
        return None


def _of_this_run(info: CheckpointInfo, run_id: str | None) -> bool:
    """Written by run ``run_id`` (or by a hashrec that did not record runs)."""
    try:
        written_by = json.loads((info.path / META).read_text()).get("run_id")
    except (OSError, ValueError):
        return True  # a damaged one: named as damaged where it is read
    return run_id is None or written_by is None or written_by == run_id


def _prune(root: Path, keep: int, step: int) -> None:
    """Delete all but this run's ``keep`` newest checkpoints (rank 0); another run's are kept."""
    run_id = folder_run_id(root)
    ours = [info for info in complete_checkpoints(root) if _of_this_run(info, run_id)]
    for old in ours[:-keep] if keep > 0 else []:
        # Renamed first, so a deletion cut short never looks like a (damaged) checkpoint.
        pruned = old.path.with_name(old.path.name + PRUNED)
        try:
            os.replace(old.path, pruned)
        except OSError:
            continue
        _fault("while_pruning", step)
        shutil.rmtree(pruned, ignore_errors=True)


def _explain(error: BaseException, root: Path) -> str:
    """One line for a failed write. torch's writer reports a full disk as a cryptic
    "unexpected pos" error, so a nearly full disk is named as such."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = None
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"No space left on device ({text})"
    if free is not None and free < 4 * 1024 * 1024:
        return f"No space left on device ({free} bytes free on {root}; {text})"
    return f"{type(error).__name__}: {text}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root`` (folders with meta.json), oldest first."""
    if not root.exists():
        return []
    found = []
    for path in root.iterdir():
        match = _ENTRY.fullmatch(path.name)
        if match and match.group(2) is None and path.is_dir() and (path / META).exists():
            found.append(CheckpointInfo(path, int(match.group(1))))
    return sorted(found, key=lambda info: info.step)


def recover_interrupted_saves(root: Path) -> None:
    """Bring ``root`` back to whole checkpoints after a save cut short at any point (rank 0).

    Nothing newer than the latest complete checkpoint is lost: a ``.partial`` with an intact
    meta.json was finished but not renamed, so it takes its step's place.
    """
    if not root.exists():
        return
    entries = [(path, _ENTRY.fullmatch(path.name)) for path in sorted(root.iterdir())]
    entries = [(path, match) for path, match in entries if match and path.is_dir()]
    for path, match in entries:
        if match.group(2) != PARTIAL:
            continue
        final = path.with_name(f"step_{match.group(1)}")
        if check_intact(path) is None:
            replaced = final.with_name(final.name + REPLACED)
            if final.exists():  # the older save of the same step, replaced as a save does
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(path, final)
            shutil.rmtree(replaced, ignore_errors=True)
            print(f"hashrec: completing checkpoint {final}, written whole before a crash "
                  f"cut its save short", flush=True)
        else:
            warnings.warn(f"removing unfinished checkpoint {path}", stacklevel=2)
            shutil.rmtree(path, ignore_errors=True)
    for path, match in entries:
        if match.group(2) == REPLACED:
            final = path.with_name(f"step_{match.group(1)}")
            if final.exists() and check_intact(final) is None:
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():  # the new one never arrived: the old one is the step's again
                shutil.rmtree(final, ignore_errors=True)
                os.replace(path, final)
        elif match.group(2) == PRUNED:
            shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(root)


def check_intact(path: Path) -> str | None:
    """None when every file of the checkpoint is there with its recorded size, else why not."""
    meta_path = path / META
    if not meta_path.exists():
        return "no meta.json (not a complete checkpoint)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable meta.json ({error})"
    for name, size in meta.get("files", {}).items():
        file = path / name
        if not file.exists():
            return f"missing file {name}"
        if file.stat().st_size != size:
            return f"file {name} has {file.stat().st_size} bytes, expected {size}"
    return None


def choose_checkpoint(resume: str, run_dir: Path) -> CheckpointInfo | None:
    """The checkpoint to resume from (decided on rank 0, shared with every rank; a
    collective: every rank must call it).

    ``auto``: the latest intact checkpoint of the run directory (None when there is none);
    damaged ones are named in a warning and skipped. A path: that checkpoint, which must be
    intact. Whatever rank 0 raises (CheckpointError, an unreadable folder) every rank raises.
    """
    return on_rank_zero(_choose, resume, run_dir)


def _choose(resume: str, run_dir: Path) -> CheckpointInfo | None:
    if resume == "auto":
        root = checkpoint_root(run_dir)
        recover_interrupted_saves(root)
        run_id = folder_run_id(root)
        for info in reversed(complete_checkpoints(root)):
            if not _of_this_run(info, run_id):
                print(f"hashrec: warning: skipping checkpoint {info.path}, written by another "
                      f"run than this run directory's ({run_id})", flush=True)
                continue
            problem = check_intact(info.path)
            if problem is None:
                return info
            print(f"hashrec: warning: skipping damaged checkpoint {info.path}: {problem}", flush=True)
        return None
    path = Path(resume)
    problem = check_intact(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return CheckpointInfo(path, json.loads((path / META).read_text())["step"])


def check_compatible(info: CheckpointInfo, model: nn.Module) -> None:
    """The model's tables must have the checkpoint's shapes and its features the checkpoint's
    ID mappings (hashing method, salts, moduli); name the first that differs."""
    meta = json.loads((info.path / META).read_text())
    saved = meta["tables"]
    current = table_shapes(model)
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            raise CheckpointError(f"checkpoint {info.path} has table {name}, which the model lacks")
        if name not in saved:
            raise CheckpointError(f"checkpoint {info.path} has no table {name}, which the model has")
        if saved[name] != current[name]:
            raise CheckpointError(
                f"checkpoint {info.path}: table {name} is {saved[name][0]} x {saved[name][1]}, "
                f"the model's is {current[name][0]} x {current[name][1]}"
            )
    if "hashing" in meta:  # checkpoints from before fingerprints have none to compare
        feature = first_difference(meta["hashing"], hashing_fingerprints(model))
        if feature is not None:
            raise CheckpointError(
                f"checkpoint {info.path} maps the IDs of feature {feature} otherwise than this "
                f"job's hashing (method, seed or sizes differ): resume with the hashing it was "
                f"trained with"
            )


def load_checkpoint(info: CheckpointInfo, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer state in place (resharding as needed); returns this rank's
    extras (RNG state restored when the world size is unchanged)."""
    check_compatible(info, model)
    # Lazily created optimizer state (Adam's) must exist before an in-place load.
    for name, part in getattr(optimizer, "optimizers", []):
        if name != "embedding" and not part.state:
            part.init_state()
    state = _app_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(info.path))
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"cannot load checkpoint {info.path}: {str(error).splitlines()[0]}") from error
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    meta = json.loads((info.path / META).read_text())
    rank = dist.get_rank() if dist.is_initialized() else 0
    extras: dict = {}
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank_file = info.path / f"rank_{rank:05d}.pt"
    if meta["world_size"] == world_size and rank_file.exists():
        extras = torch.load(rank_file, weights_only=False)
        torch.set_rng_state(extras.pop("rng"))
    return extras
