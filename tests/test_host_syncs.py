"""The rule: no host-device sync in a training step, except on logging steps.

On a GPU a host read of a device tensor (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
``.cpu()``) waits for every kernel queued before it, and the pipeline's overlap of input
distribution with compute is gone. This machine has no GPU, but the calls can be counted on
CPU: ``.item()``, ``bool()``, ``int()`` and ``float()`` dispatch ``aten::_local_scalar_dense``,
which a TorchDispatchMode sees; ``.tolist()``, ``.numpy()`` and ``.cpu()`` of a CPU tensor
dispatch nothing (on CUDA they copy to the host first), so a profile hook counts those calls.
Both count only the training thread (the prefetch thread makes batches on the host).

The real Trainer (train/loop.py) runs the tiny job on 2 gloo ranks through TorchRec's pipeline,
with the real CheckpointPolicy voting on stop signals; each read is attributed to the step
whose ``pipeline.progress`` call it follows (so a logging step includes its report) and to the
code that made it (the innermost Python frame outside torch's dispatch machinery).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.helpers import REPO, TINY, compose_config, run_ranks

LOG_EVERY = 4
STEPS = 8  # below train.loop.WARMUP_STEPS: one segment, [0, STEPS)
SIGNAL_CHECK_EVERY = 2

# Code that reads tensors which live on the host in a GPU run too, so reading them is no sync
# there; each with where it is and why it is host memory.
HOST_TENSOR_READS = {
    # torch.optim keeps a non-capturable optimizer's step count in a CPU tensor
    # (``torch.tensor(0.0)`` in Adagrad._init_group) and reads it with .item().
    "torch/optim/optimizer.py:_get_value",
    # fbgemm's TBE: ``iter_cpu``, a CPU copy of its iteration counter (``.cpu()``, ``.item()``),
    # and ``feature_dims``, a buffer made with device="cpu" (``.cpu()``).
    "fbgemm_gpu/split_table_batched_embeddings_ops_training.py:forward",
    "fbgemm_gpu/split_table_batched_embeddings_ops_training.py:_generate_vbe_metadata",
    # hashrec's stop vote: a CPU tensor, reduced on a gloo group of its own
    # (train/collectives.py, AnyRankVote).
    "train/collectives.py:vote",
}
# C++ code inside loss.backward() has no Python frame of its own. The only such reads are
# DDP's reducer under static_graph (TorchRec's default), which reads its used-parameter map,
# an int32 host tensor (pinned on CUDA), once per dense parameter (torch/csrc/distributed/
# c10d/reducer.cpp, ``local_used_map_[index].item<int>()``).
BACKWARD_ENGINE = "torch/autograd/graph.py:_engine_run_backward"
# TorchRec's input distribution needs sizes on the host: the all-to-all splits of batch i+1
# (read in the pipeline's data-dist stages) and the per-key lengths of the KJT each rank
# receives (read when the sharded collection waits for its input; ``Awaitable.wait`` also
# covers TorchRec's other awaited results). It reads them on its data-dist stream
# (``_cuda_to_cpu_safe`` waits for that stream only, so compute goes on). That is TorchRec's
# design, not ours; a read made by hashrec code that the pipeline calls there (the ID mappers
# run in the data-dist stage) still counts.
DATA_DIST_STAGES = (
    "torchrec/distributed/train_pipeline/train_pipelines.py:start_sparse_data_dist",
    "torchrec/distributed/train_pipeline/train_pipelines.py:wait_sparse_data_dist",
    "torchrec/distributed/types.py:wait",
)
# TorchRec checks the first batch's KJTs once, when it sets up a collection's input dist.
ONCE_PER_RUN = "torchrec/sparse/jagged_tensor_validator.py:"

_DISPATCH_MACHINERY = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py")
_HOST_READ_METHODS = ("tolist", "numpy", "cpu")


def _name(frame) -> str:
    """``package/file.py:function`` of a frame, relative to site-packages or the repository."""
    path = frame.f_code.co_filename.replace("\\", "/")
    for root in ("site-packages/", str(REPO) + "/"):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{path}:{frame.f_code.co_name}"


def _is_hashrec(name: str) -> bool:
    return name.startswith(("modules/", "train/"))


def _classify(frame) -> tuple[str, bool]:
    """(the reading code, whether the read counts) for a read whose caller is ``frame``."""
    while frame is not None:  # step out of the dispatch machinery and this file
        path = frame.f_code.co_filename.replace("\\", "/")
        if path != __file__ and not any(part in path for part in _DISPATCH_MACHINERY):
            break
        frame = frame.f_back
    if frame is None:
        return "?", True
    site = _name(frame)
    if site in HOST_TENSOR_READS:
        return site, False
    outer = frame
    while outer is not None:  # whose read: hashrec's, or TorchRec's input distribution?
        name = _name(outer)
        if _is_hashrec(name):
            return (site if name == site else f"{site} called from {name}"), True
        if name in DATA_DIST_STAGES:
            return site, False
        outer = outer.f_back
    return site, True


class HostReadCounter(TorchDispatchMode):
    """Records every host read of a tensor's values made on this thread, by step label."""

    def __init__(self) -> None:
        super().__init__()
        self.label: str = "setup"
        self.reads: dict[str, list[str]] = defaultdict(list)

    def _record(self, what: str, frame, dtype: torch.dtype) -> None:
        site, counts = _classify(frame)
        if site.startswith(BACKWARD_ENGINE) and dtype == torch.int32:
            counts = False  # DDP's host-side used-parameter map (see BACKWARD_ENGINE)
        if site.startswith(ONCE_PER_RUN) and self.label == "0":
            counts = False
        if counts:
            self.reads[self.label].append(f"{what} in {site}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record("item/bool/int", sys._getframe(1), args[0].dtype)
        return func(*args, **(kwargs or {}))

    def _profile(self, frame, event, arg) -> None:
        if event == "c_call" and getattr(arg, "__name__", None) in _HOST_READ_METHODS:
            tensor = getattr(arg, "__self__", None)
            if isinstance(tensor, torch.Tensor):
                self._record(f".{arg.__name__}()", frame, tensor.dtype)

    def __enter__(self):
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc):
        sys.setprofile(None)
        return super().__exit__(*exc)


# A rank that waits for a collective its peers never join would hang the test: after this
# many seconds it prints where it waits and exits, and the test fails.
HANG_SECONDS = 240


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_counting(rank: int, world_size: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    from modules.data_sources import PlantedSource
    from modules.prefetch import prefetched
    from train.build import build_sharded_job
    from train.checkpoint_policy import CheckpointPolicy
    from train.data import planted_data
    from train.distributed import DistributedContext
    from train.loop import DataFeed, Reporting, Trainer, TrainingParts
    from train.optimizers import WarmupDecaySchedule
    from train.run import validated

    postproc_log = _Captured()
    logging.getLogger("torchrec.distributed.train_pipeline.postproc").addHandler(postproc_log)
    config, groups = validated(compose_config(
        [*TINY, f"logger.log_every={LOG_EVERY}",
         f"checkpoint.signal_check_every={SIGNAL_CHECK_EVERY}"]
    ))
    context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    job = build_sharded_job(config, groups, context)
    source = PlantedSource(planted_data(config, groups), num_eval_batches=2)
    policy = CheckpointPolicy(Path(out_dir) / "run", job.model, job.optimizer,
                              config.checkpoint, STEPS, lambda _: None)
    trainer = Trainer(
        TrainingParts(job.model, job.optimizer, WarmupDecaySchedule(job.optimizer, config.optim)),
        context,
        DataFeed(
            train_batches=lambda start, stop: prefetched(
                source.train_batches(rank, world_size, start, stop), depth=2),
            eval_batches=lambda: source.eval_batches(rank, world_size),
            batch_size=config.trainer.batch_size,
        ),
        Reporting(log_every=LOG_EVERY, print_fn=lambda _: None, progress_bar=False),
        hooks=[policy],
    )
    counter = HostReadCounter()
    progress = trainer.pipeline.progress
    next_step = [0]

    def labelled_progress(batches):
        # Reads after this call (the report, after_step) belong to this step.
        if job.model.training:
            counter.label = str(next_step[0])
            next_step[0] += 1
        else:
            counter.label = "eval"
        return progress(batches)

    trainer.pipeline.progress = labelled_progress
    with counter:
        trainer.train(STEPS, eval_every=0)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"reads": counter.reads, "postproc_warnings": postproc_log.messages}
    ))


def test_no_host_sync_in_a_training_step_except_logging_steps(tmp_path):
    run_ranks(_train_counting, 2, str(tmp_path))
    logging_steps = {s for s in range(STEPS) if (s + 1) % LOG_EVERY == 0 or s + 1 == STEPS}
    for rank in range(2):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        reads = found["reads"]
        counts = {str(s): len(reads.get(str(s), [])) for s in range(STEPS)}
        print(f"rank {rank} host reads per step: {counts}")
        offending = {
            step: sorted(set(sites)) for step, sites in reads.items()
            if step.isdigit() and int(step) not in logging_steps and sites
        }
        assert not offending, f"rank {rank}: host syncs outside logging steps: {offending}"
        # The logging steps do sync (the report reads the gathered figures): the counter works.
        assert all(counts[str(s)] > 0 for s in logging_steps), counts
        if rank == 0:
            # The window's train AUC / NE are scored there, from the logits each step kept on
            # the device: the counter sees those reads at the logging steps and nowhere else.
            assert all(any("modules/metrics.py" in site for site in reads[str(s)])
                       for s in logging_steps), reads
        # TorchRec's "no dist stream" warning is noise on CPU (no streams) and is not printed.
        assert found["postproc_warnings"] == []


# --- The pieces the rule rests on ------------------------------------------------------------


def _planted_batch(config_overrides: list[str]):
    from train.data import planted_data
    from train.run import validated

    config, groups = validated(compose_config([*TINY, *config_overrides]))
    return planted_data(config, groups).batch("train", rank=0, step=0)[0]


def _assert_sizes_from_host(batch) -> None:
    for kjt in batch.sparse_features.values():
        assert kjt._length_per_key is not None and kjt._offset_per_key is not None
        lengths = kjt.lengths().view(len(kjt.keys()), -1).sum(dim=1).tolist()
        assert kjt._length_per_key == lengths
        assert kjt._offset_per_key == [0, *torch.tensor(lengths).cumsum(0).tolist()]


def test_batches_carry_lengths_per_key_from_the_host_through_to():
    batch = _planted_batch([])
    _assert_sizes_from_host(batch)
    _assert_sizes_from_host(batch.to(torch.device("cpu"), non_blocking=True))


def test_tabular_batches_carry_lengths_per_key_with_missing_values():
    import numpy as np

    from modules.tabular import MISSING_ID, columns_to_batch
    from train.run import validated

    _, groups = validated(compose_config(TINY))
    rows = 5
    categorical = {
        f.name: np.where(np.arange(rows) % (i + 2) == 0, MISSING_ID, np.arange(rows) + i)
        for group in groups for i, f in enumerate(group.features)
    }
    batch = columns_to_batch(np.zeros(rows), np.zeros((rows, 13), np.float32), categorical, groups)
    _assert_sizes_from_host(batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pinned_batch_keeps_lengths_per_key_and_copies_to_the_device():
    pinned = _planted_batch([]).pin_memory()
    assert pinned.dense_features.is_pinned()
    _assert_sizes_from_host(pinned)
    _assert_sizes_from_host(pinned.to(torch.device("cuda"), non_blocking=True))


def test_batches_are_pinned_only_for_cuda_and_on_the_prefetch_thread():
    from modules.prefetch import pin_batches_for, prefetched

    assert pin_batches_for(torch.device("cuda", 3))
    assert not pin_batches_for(torch.device("cpu"))

    class Item:  # records where it was pinned (pinning a real batch needs CUDA)
        pinned_on: str | None = None

        def pin_memory(self) -> Item:
            self.pinned_on = threading.current_thread().name
            return self

    items = list(prefetched(iter([Item(), Item()]), depth=2, pin_memory=True))
    assert [item.pinned_on for item in items] == ["batch-prefetch"] * 2
    assert [item.pinned_on for item in prefetched(iter([Item()]), depth=2)] == [None]


def _votes_and_range_errors(rank: int, world_size: int, out_dir: str) -> None:
    """Both collectives the loop uses to stop every rank together, without a model."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    from modules.features import FeatureSpec, HashingSpec
    from modules.id_mapping import HashingIdMapper, IdOutOfRangeError
    from train.collectives import AnyRankVote
    from train.id_range_checks import deferred_id_range_errors, raise_if_ids_out_of_range

    vote = AnyRankVote()
    # Rank 1 alone gets a signal before the third vote.
    outcomes = [vote.vote(rank == 1 and index >= 2) for index in range(5)]

    def mapper(rows: int) -> HashingIdMapper:
        return HashingIdMapper([FeatureSpec("h", 10**6, 100, hashing=HashingSpec("hash")),
                                FeatureSpec("n", rows, rows, hashing=HashingSpec("none"))])

    model = torch.nn.ModuleDict({"first": mapper(100), "second": mapper(50)})
    ids = {"h": torch.tensor([5, 6]), "n": torch.tensor([1, 70 if rank == 1 else 2])}
    batch = KeyedJaggedTensor(["h", "n"], torch.cat(list(ids.values())),
                              lengths=torch.ones(4, dtype=torch.int32))
    with deferred_id_range_errors(model):
        model["first"](batch)
        model["second"](batch)  # rank 1: 70 is outside [0, 50)
    restored = not model["second"].defer_range_errors
    try:
        raise_if_ids_out_of_range(model)
        message = None
    except IdOutOfRangeError as error:
        message = str(error)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"outcomes": outcomes, "message": message, "restored": restored}
    ))


@pytest.fixture(scope="module")
def two_ranks_stopping(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("stopping")
    run_ranks(_votes_and_range_errors, 2, str(out_dir))
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_stop_vote_stops_every_rank_at_the_same_vote(two_ranks_stopping):
    """Cast at vote 2 by one rank, acted on by every rank at vote 3 (one vote later), and
    from then on (training stops there)."""
    for found in two_ranks_stopping:
        assert found["outcomes"] == [False, False, False, True, True]


def test_an_out_of_range_id_on_one_rank_stops_every_rank_with_its_message(two_ranks_stopping):
    messages = [found["message"] for found in two_ranks_stopping]
    assert messages[0] == messages[1]
    assert messages[0].startswith("feature n (hashing none): raw ID 70 is outside [0, 50)")
    assert all(found["restored"] for found in two_ranks_stopping)  # immediate again after
