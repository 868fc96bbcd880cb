import math

import pytest

from sd_zoo import expected_depth, survival_schedule


def test_linear_schedule_matches_paper_formula():
    probs = survival_schedule(54, 0.5, 'linear')
    assert len(probs) == 54
    for l, p in enumerate(probs, start=1):
        assert p == pytest.approx(1 - l / 54 * 0.5)
    assert probs[-1] == pytest.approx(0.5)
    assert probs[0] == pytest.approx(1 - 0.5 / 54)
    assert all(a > b for a, b in zip(probs, probs[1:]))


def test_resnet110_expected_depth_is_40_25():
    assert expected_depth(54, 0.5) == pytest.approx(40.25)
    # closed form: L - (1 - p_L) (L + 1) / 2
    for L, pl in [(9, 0.5), (27, 0.8), (600, 0.5)]:
        assert expected_depth(L, pl) == pytest.approx(L - (1 - pl) * (L + 1) / 2)


def test_uniform_and_constant_depth():
    assert survival_schedule(5, 0.7, 'uniform') == [0.7] * 5
    assert survival_schedule(5, 1.0, 'linear') == [1.0] * 5
    assert expected_depth(54, 0.5, 'uniform') == pytest.approx(27.0)


@pytest.mark.parametrize('p_last', [0.0, -0.1, 1.5, math.nan, '0.5', None])
def test_survival_prob_outside_range_is_a_clear_value_error(p_last):
    with pytest.raises(ValueError, match=r'p_L|survival probability'):
        survival_schedule(10, p_last)


def test_unknown_rule_and_bad_block_count():
    with pytest.raises(ValueError, match="rule 'cosine'"):
        survival_schedule(10, 0.5, 'cosine')
    with pytest.raises(ValueError, match='num_blocks'):
        survival_schedule(0, 0.5)
