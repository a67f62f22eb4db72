import pytest

from matvlm.convert.layers import parse_layer_list, select_layers
from matvlm.errors import MatvlmError


@pytest.mark.parametrize("n,ratio,placement,expected", [
    (32, 0.25, "even", [0, 4, 8, 12, 16, 20, 24, 28]),          # the paper's 25 % of TinyLLaVA's 32 layers
    (32, 0.125, "even", [0, 8, 16, 24]),
    (32, 0.5, "even", list(range(0, 32, 2))),
    (30, 0.25, "even", [0, 3, 7, 11, 15, 18, 22, 26]),          # 7.5 rounds up to 8 layers
    (8, 0.25, "begin", [0, 1]),
    (8, 0.25, "end", [6, 7]),
    (8, 0.25, "middle", [3, 4]),
    (4, 1.0, "even", [0, 1, 2, 3]),
    (4, 0.01, "even", [0]),                                      # at least one layer
])
def test_select_layers(n, ratio, placement, expected):
    assert select_layers(n, ratio, placement) == expected


def test_explicit_layers_win_and_are_checked():
    assert select_layers(8, 0.5, "end", [5, 1]) == [1, 5]
    with pytest.raises(MatvlmError, match=r"\[8\] out of range: the model has layers 0..7"):
        select_layers(8, layers=[0, 8])
    with pytest.raises(MatvlmError, match="repeats"):
        select_layers(8, layers=[1, 1])


@pytest.mark.parametrize("ratio", [0, -0.5, 1.01])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(MatvlmError, match=r"must be in \(0, 1\]"):
        select_layers(8, ratio)


def test_parse_layer_list():
    assert parse_layer_list("0,4, 8") == [0, 4, 8]
    with pytest.raises(MatvlmError, match="comma-separated integers"):
        parse_layer_list("0;4")
