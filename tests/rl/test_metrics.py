"""A step's metrics line from its rollouts and scores alone (no model): numbers by hand."""
import pytest

from tao_fast.rl.metrics import rollout_metrics
from tao_fast.rollout import Rollouts
from tao_fast.scoring import ScoreResult


def test_metrics_by_hand():
    # 2 prompts x 2 candidates; responses of 1, 3, 2 and 2 tokens
    ro = Rollouts([[1], [2]], [[[5], [5, 6, 7]], [[8, 9], [8, 9]]], [["a", "b"], ["c", "c"]],
                  [[[-1.0], [-1.0] * 3], [[-1.0] * 2] * 2], [["stop"] * 2] * 2,
                  stats={"tokens": 8, "seconds": 2.0, "tokens_per_s": 4.0})
    sc = ScoreResult([[1.0, 0.0], [0.5, 0.5]], failures={"rules": 1}, stats={"rules/x": 0.25})
    m = rollout_metrics(ro, sc, [True, False], gen_seconds=2.0, score_seconds=0.5)
    assert m["reward_mean"] == pytest.approx(0.5)  # (1 + 0 + .5 + .5) / 4
    assert m["reward_std"] == pytest.approx(0.125 ** 0.5)  # var = (.25 + .25 + 0 + 0) / 4
    assert (m["zero_signal_groups"], m["zero_signal_frac"]) == (1, 0.5)
    assert (m["score_failures"], m["score_failures/rules"], m["rules/x"]) == (1, 1, 0.25)
    assert m["score_failure_frac"] == 0.25
    assert m["response_tokens_mean"] == pytest.approx(8 / 4)
    assert (m["gen_tokens"], m["gen_tokens_per_s"]) == (8, 4.0)
    assert (m["gen_seconds"], m["score_seconds"]) == (2.0, 0.5)


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="at least one scored candidate"):
        rollout_metrics(Rollouts.empty(), ScoreResult([]), [], 0.0, 0.0)
