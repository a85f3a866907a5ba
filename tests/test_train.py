"""The interim main job (fastdp-train on scikit-learn digits)."""

import pytest

from fastdp.train import main


def test_short_run_learns_within_the_privacy_target():
    summary = main(["--epochs", "3", "--epsilon", "4"])
    assert summary["epsilon"] <= 4.0
    assert summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize("args", [["--epsilon", "0"], ["--batch-size", "100000"]])
def test_bad_input_is_a_one_line_error(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert str(e.value).startswith("fastdp-train: ")
