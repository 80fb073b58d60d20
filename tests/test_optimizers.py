import pytest

from train.optimizers import lr_scale


def test_warmup_then_constant_then_polynomial_decay():
    scales = [lr_scale(step, 4, 10, 5) for step in range(17)]
    assert scales[:4] == [0.25, 0.5, 0.75, 1.0]
    assert scales[4:10] == [1.0] * 6
    assert scales[10:15] == pytest.approx([1.0, 0.64, 0.36, 0.16, 0.04])
    assert scales[15:] == [0.0, 0.0]


def test_no_schedule_is_constant():
    assert {lr_scale(step, 0, 0, 0) for step in range(100)} == {1.0}
