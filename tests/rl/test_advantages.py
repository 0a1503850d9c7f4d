import math

import pytest

from tao_fast.rl.advantages import group_advantages


def test_grpo_hand_values():
    # rewards 1, 0, 0, 1: mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.57735
    (a,), (sig,) = group_advantages([[1.0, 0.0, 0.0, 1.0]], "grpo")
    assert sig
    assert a == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


def test_grpo_without_std_and_dr_grpo():
    # rewards 3, 1, 2: mean 2 -> centred 1, -1, 0
    (a,), _ = group_advantages([[3.0, 1.0, 2.0]], "grpo", std_normalize=False)
    assert a == pytest.approx([1.0, -1.0, 0.0])
    (b,), _ = group_advantages([[3.0, 1.0, 2.0]], "dr-grpo")
    assert b == pytest.approx([1.0, -1.0, 0.0])


def test_rloo_hand_values():
    # rewards 1, 0, 0: r_i - mean(others) = 1 - 0, 0 - 0.5, 0 - 0.5
    (a,), _ = group_advantages([[1.0, 0.0, 0.0]], "rloo")
    assert a == pytest.approx([1.0, -0.5, -0.5])


def test_all_equal_group_has_no_signal():
    advs, sig = group_advantages([[1.0, 1.0, 1.0], [0.0, 0.0], [0.0, 1.0]], "grpo")
    assert sig == [False, False, True]
    assert advs[0] == [0.0, 0.0, 0.0] and advs[1] == [0.0, 0.0]


def test_single_candidate_has_no_signal():
    advs, sig = group_advantages([[0.7]], "grpo")
    assert sig == [False] and advs == [[0.0]]


def test_bad_input():
    with pytest.raises(ValueError, match="algorithm"):
        group_advantages([[1.0, 0.0]], "ppo")
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages([[1.0, math.nan]], "grpo")
    with pytest.raises(ValueError, match="no candidates"):
        group_advantages([[]], "grpo")
