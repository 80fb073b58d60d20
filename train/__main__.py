"""Entry point: compose the Hydra config and call run()."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train.install_check import stop_if_unfit

# Before torchrec is imported: with a CUDA fbgemm beside a CPU torch, importing it fails with a
# traceback before init_distributed's own check could name the fix.
stop_if_unfit()

from train.config import register_configs  # noqa: E402
from train.run import STOPPED_EXIT_CODE, ConfigError, Stopped, run  # noqa: E402

register_configs()


def _say(line: object) -> None:
    """One line to stderr in one write: the ranks of a job share one stderr, and print()'s
    separate write of the newline let two ranks' lines run together."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _say(f"hashrec: error: {error}")
        raise SystemExit(2) from None
    except Stopped as stopped:
        _say(f"hashrec: {stopped}")
        raise SystemExit(STOPPED_EXIT_CODE) from None
    except KeyboardInterrupt as interrupt:
        # Ctrl-C outside training (build, data, eval after training, summary) or a second
        # Ctrl-C during it (train/checkpoint_policy.py; the first one is a clean stop).
        _interrupted(interrupt)


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
