"""A data option that only fits one feature set selects it; a mismatch names the fix."""

from __future__ import annotations

import pytest

from tests.helpers import CONF_DIR, compose_config

DATA_OPTIONS = sorted(path.stem for path in (CONF_DIR / "data").glob("*.yaml"))


# The feature set each data option selects; the Criteo ones name theirs in data.feature_set.
FEATURE_SETS = {"criteo_sample": "criteo", "criteo_kaggle": "criteo", "criteo_1tb": "criteo_mlperf"}


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_data_option_alone_composes_with_its_feature_set(option):
    overrides = [f"data={option}"]
    if option == "parquet":  # the user's own logs: paths are required
        overrides += ["data.train_path=/logs/train", "data.eval_path=/logs/eval"]
    config = compose_config(overrides)
    # Parquet derives its features from its columns (any set fits it, so none is named).
    expected = {"parquet": "from_data", **FEATURE_SETS}.get(option, "default")
    assert config.features.name == expected
    assert config.data.feature_set == FEATURE_SETS.get(option)


def test_features_on_the_command_line_still_win():
    config = compose_config(["data=criteo_kaggle", "features=criteo_mlperf"])
    assert (config.features.name, config.data.name) == ("criteo_mlperf", "criteo_kaggle")
    # The experiment no longer names the feature set: its data option does.
    assert compose_config(["experiment=criteo_sample"]).features.name == "criteo"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data=criteo_sample", "features=default"],
         "data=criteo_sample is Criteo data, but features=default names features "
         "['user_id', 'user_country', 'user_interests'] ... that are not among its categorical "
         "columns C1..C26: pass features=criteo"),
        (["data=criteo_1tb", "features=many_tables"], ": pass features=criteo_mlperf"),
        (["data=criteo_sample", "features.num_dense_features=5"],
         "features=criteo has features.num_dense_features=5: pass features.num_dense_features=13"),
    ],
)
def test_a_feature_set_that_does_not_fit_names_the_one_to_pass(overrides, message):
    with pytest.raises(ValueError) as error:
        compose_config(overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)

