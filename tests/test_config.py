import pytest

from liedeploy import LieConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0, targets=["x"]), "LieConfig.r must be a positive integer, got 0"),
        (dict(r=2.5, targets=["x"]), "LieConfig.r must be a positive integer, got 2.5"),
        (dict(alpha=float("nan"), targets=["x"]), "LieConfig.alpha must be a finite number, got nan"),
        (dict(expmap="taylor", targets=["x"]), "LieConfig.expmap must be one of exact, first_order, got 'taylor'"),
        (dict(targets=[]), "LieConfig.targets must be a regex string or a non-empty list of names, got []"),
        (dict(targets="("), "LieConfig.targets '(' is not a valid regex"),
        (dict(), "LieConfig.targets is None and no filter_fn given"),
        (dict(targets=["x"], rank_pattern={"q": 0}), "LieConfig.rank_pattern['q'] must be a positive integer rank, got 0"),
        (dict(targets=["x"], alpha_pattern={"q": "big"}), "LieConfig.alpha_pattern['q'] must be a number, got 'big'"),
        (dict(targets=["x"], version=2), "LieConfig.version must be 1, got 2"),
        (dict(targets=["x"], filter_fn=3), "LieConfig.filter_fn must be callable"),
    ],
)
def test_invalid_values_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        LieConfig(**kwargs)
    assert message in str(err.value)


def test_round_trip_dict():
    cfg = LieConfig(r=4, alpha=16, expmap="first_order", targets=["q", "v"], rank_pattern={"v": 2})
    again = LieConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.scale_for("layer.0.v.weight") == 8.0 and again.scale_for("layer.0.q.weight") == 4.0
