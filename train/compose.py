"""The typed config that ``python -m train <overrides>`` would run, composed without running
it: for scripts that measure parts of a job, and for tests."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from train.config import REPO_ROOT, Config, register_configs
from train.run import to_config

CONF_DIR = REPO_ROOT / "conf"


def compose_config(overrides: list[str]) -> Config:
    """Compose conf/config.yaml with Hydra ``overrides`` and check it against the schema
    (a bad key or value raises here, as it stops ``python -m train``)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_config(cfg)
