"""Entry point: compose the Hydra config and call run()."""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C in the seconds torch, torchrec and Hydra take to import: nothing has started,
    so one line and 130, not a KeyboardInterrupt traceback from deep inside an import."""
    os.write(2, b"hashrec: interrupted\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_while_starting)

# Before anything imports torch: its OpenMP runtime reads how idle threads wait once, when it
# loads (train/threads.py says why they spin only briefly).
from train.threads import limit_openmp_spinning  # noqa: E402

limit_openmp_spinning()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from train.install_check import stop_if_unfit  # noqa: E402

# Before torchrec is imported: with a CUDA fbgemm beside a CPU torch, importing it fails with a
# traceback before init_distributed's own check could name the fix.
stop_if_unfit()

from train.config import register_configs  # noqa: E402
from train.rank_failures import RANK_FAILED_EXIT_CODE, RankFailed  # noqa: E402
from train.run import STOPPED_EXIT_CODE, ConfigError, Stopped, run  # noqa: E402
from train.sweep_results import write_unfinished_sweep_results  # noqa: E402

register_configs()
# Imports done: Ctrl-C is a KeyboardInterrupt again, which the job turns into a clean stop.
signal.signal(signal.SIGINT, signal.default_int_handler)


def _say(line: object) -> None:
    """One line to stderr in one write: the ranks of a job share one stderr, and print()'s
    separate write of the newline let two ranks' lines run together."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        hydra_config = HydraConfig.get()
        run(cfg, hydra_config.runtime.output_dir, _job_files(cfg, hydra_config))
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _say(f"hashrec: error: {error}")
        raise SystemExit(2) from None
    except RankFailed as failed:  # another rank's error, already printed by that rank
        if failed.announce:
            _say(f"hashrec: error: {failed}")
        raise SystemExit(RANK_FAILED_EXIT_CODE) from None
    except Stopped as stopped:
        _say(f"hashrec: {stopped}")
        raise SystemExit(STOPPED_EXIT_CODE) from None
    except KeyboardInterrupt as interrupt:
        # Ctrl-C outside training (build, data, eval after training, summary) or a second
        # Ctrl-C during it (train/checkpoint_policy.py; the first one is a clean stop).
        _interrupted(interrupt)


def _job_files(cfg: DictConfig, hydra_config: DictConfig) -> dict[str, str]:
    """What Hydra writes into a run's .hydra folder (hydra.output_subdir is off in
    conf/config.yaml: the job writes them once it holds the run directory)."""
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_config}),
        "overrides.yaml": OmegaConf.to_yaml(hydra_config.overrides.task),
    }


def _interrupted(interrupt: KeyboardInterrupt) -> None:
    """One line and 130 (128 + SIGINT, what a shell reports for Ctrl-C), no traceback."""
    if interrupt.args:
        _say(f"hashrec: interrupted ({interrupt}): stopped now without saving")
    else:
        _say("hashrec: interrupted")
    raise SystemExit(130) from None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as interrupt:  # in Hydra's composition, before main's body
        _interrupted(interrupt)
    finally:
        # A sweep that a failed point ended still writes its results table (Hydra skips its
        # on_multirun_end then); nothing for a single run.
        write_unfinished_sweep_results()
