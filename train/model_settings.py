"""The optimizer settings a model brings: the one line a job prints about them.

A model option may be unstable under an optimizer's own settings (DCNv2 under Adagrad at
lr 0.05 diverges in its first step: docs/models.md). conf/model_optim/<model>_<optim>.yaml
holds the settings the model is stable with under that optimizer; Hydra loads it after the
optim group (conf/config.yaml), so the command line and experiments still win, and records
what it set in ``optim.model_settings``. This module only says what the job runs with.
"""

from __future__ import annotations

from train.config import Config


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def model_settings_line(config: Config) -> str | None:
    """One line: the optimizer settings in effect, naming the model's file and any of its
    settings the command line or an experiment replaced; None when the model brings none
    (the optimizer's own settings run)."""
    optim = config.optim
    if not optim.model_settings:
        return None
    schedule = f", warm-up {optim.warmup_steps} steps" if optim.warmup_steps else ""
    line = (
        f"optim={optim.name} with model={config.model.name}'s settings "
        f"(conf/model_optim/{config.model.name}_{optim.name}.yaml): "
        f"embedding {optim.embedding} lr {_value(optim.embedding_lr)}, "
        f"dense {optim.dense} lr {_value(optim.dense_lr)}{schedule}"
    )
    replaced = [
        f"optim.{key}={_value(getattr(optim, key))} over the model's {_value(value)}"
        for key, value in optim.model_settings.items()
        if getattr(optim, key) != value
    ]
    return line + (f" ({', '.join(replaced)})" if replaced else "")
