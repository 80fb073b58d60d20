"""Entry point: compose the Hydra config and call run()."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from train.config import register_configs
from train.run import run
from train.run_dir import run_id

register_configs()
OmegaConf.register_new_resolver("hashrec_run_id", run_id, use_cache=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    sys.exit(main())
