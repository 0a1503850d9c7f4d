"""The GRPO family's pieces, each against numbers worked out by hand: GSPO's and SFT's losses,
reward and advantage shaping (DAPO's overlong penalty, the length preference), bon-sft's
choice, the overlong filter, dynamic sampling's choice, and the algorithm table's defaults."""
import math

import pytest
import torch

from tao_fast.config import ConfigError, RLConfig, load_config
from tao_fast.rl.advantages import (best_of_group, group_advantages, length_adjusted,
                                    overlong_penalty)
from tao_fast.rl.algorithms import ALGORITHMS, resolve
from tao_fast.rl.batch import build_samples, fill_groups, reward_signal, take_groups
from tao_fast.rl.losses import gspo_loss, sft_loss
from tao_fast.rollout import Rollouts
from tao_fast.scoring.base import ScoreResult


def _packed(*seqs):
    """Per-token lists of equal-length pieces -> packed [T] tensors and cu_seqlens."""
    cu = torch.tensor([0, *torch.cumsum(torch.tensor([len(s) for s in seqs]), 0).tolist()],
                      dtype=torch.int32)
    return torch.tensor([x for s in seqs for x in s], dtype=torch.float64), cu


def test_gspo_loss_hand_values():
    # seq 1: log-ratios 0.1, 0.3 -> s1 = exp(0.2) = 1.22140, A = +1, inside 1 + 0.3: l1 = -s1
    # seq 2: log-ratio -0.2 -> s2 = exp(-0.2) = 0.81873, A = -1, inside 1 - 0.3: l2 = +s2
    # loss = (-1.22140 + 0.81873) / 2 = -0.201336
    old, cu = _packed([-1.0, -2.0], [-0.5])
    logp = (old + torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64)).requires_grad_()
    adv, _ = _packed([1.0, 1.0], [-1.0])
    mask = torch.ones(3, dtype=torch.bool)
    loss, st = gspo_loss(logp, old, adv, mask, cu, clip_low=0.3, clip_high=0.3)
    assert float(loss.detach()) == pytest.approx((-math.exp(0.2) + math.exp(-0.2)) / 2, abs=1e-6)
    assert float(st["clip_frac"]) == 0.0
    assert float(st["ratio_max"]) == pytest.approx(math.exp(0.2), abs=1e-6)
    loss.backward()
    # d l1 / d logp_t = -A s1 / |y1| (the mean over 2 tokens), then / 2 sequences
    g = logp.grad.tolist()
    assert g[0] == pytest.approx(-math.exp(0.2) / 4, abs=1e-6) and g[0] == pytest.approx(g[1])
    assert g[2] == pytest.approx(math.exp(-0.2) / 2, abs=1e-6)


def test_gspo_clips_the_sequence_ratio():
    # clip 0.1: s1 = 1.2214 -> 1.1 for A > 0 (max(-1.2214, -1.1) = -1.1: clipped, no gradient);
    # s2 = 0.8187 -> 0.9 for A < 0 (max(0.8187, 0.9) = 0.9: clipped)
    old, cu = _packed([-1.0, -2.0], [-0.5])
    logp = (old + torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64)).requires_grad_()
    adv, _ = _packed([1.0, 1.0], [-1.0])
    loss, st = gspo_loss(logp, old, adv, torch.ones(3, dtype=torch.bool), cu,
                         clip_low=0.1, clip_high=0.1)
    assert float(loss.detach()) == pytest.approx((-1.1 + 0.9) / 2, abs=1e-6)
    assert float(st["clip_frac"]) == 1.0
    loss.backward()
    assert logp.grad.abs().max() == 0.0


def test_gspo_masked_tokens_and_importance_weight():
    # seq 1's second token is the prompt (masked): its ratio is the first token's only.
    # sampler 0.7 below old on seq 1's counted token -> weight exp(0.7) = 2.01 capped at 2.
    old, cu = _packed([-1.0, -2.0], [-0.5])
    logp = old + torch.tensor([0.1, 5.0, 0.0], dtype=torch.float64)
    adv, _ = _packed([1.0, 1.0], [-1.0])
    mask = torch.tensor([True, False, True])
    sampler = old - torch.tensor([0.7, 0.0, 0.0], dtype=torch.float64)
    loss, _ = gspo_loss(logp, old, adv, mask, cu, clip_low=0.3, clip_high=0.3,
                        sampler_logp=sampler, tis_cap=2.0)
    assert float(loss) == pytest.approx((-math.exp(0.1) * 2.0 + 1.0) / 2, abs=1e-6)


def test_sft_loss_hand_values():
    lp, cu = _packed([-1.0, -2.0], [-3.0, -5.0])
    mask = torch.tensor([True, True, False, True])
    loss, st = sft_loss(lp, mask)  # (1 + 2 + 5) / 3
    assert float(loss) == pytest.approx(8 / 3) and float(st["nll"]) == pytest.approx(8 / 3)
    loss, _ = sft_loss(lp, mask, agg="seq-mean-token-mean", cu_seqlens=cu)  # (1.5 + 5) / 2
    assert float(loss) == pytest.approx(3.25)
    loss, _ = sft_loss(lp, mask, agg="token-sum-norm", loss_norm=16.0)  # 8 / 16
    assert float(loss) == pytest.approx(0.5)


def test_overlong_penalty_hand_values():
    # DAPO eq. 13 with L_max = 64, L_cache = 10: 0 up to 54 tokens, then -(len - 54) / 10
    assert overlong_penalty(54, 64, 10) == 0.0
    assert overlong_penalty(60, 64, 10) == pytest.approx(-0.6)
    assert overlong_penalty(64, 64, 10) == pytest.approx(-1.0)


def test_length_adjusted_prefers_the_shorter_of_equal_scores():
    advs, sig = group_advantages([[1.0, 1.0, 0.0], [1.0, 1.0]], "centered")
    # group 1: lengths 10, 30, 20 (mean 20), coef 0.5, max 40: shift -0.5 * (len - 20) / 40
    out = length_adjusted(advs, [[10, 30, 20], [5, 9]], sig, 0.5, 40)
    assert out[0] == pytest.approx([1 / 3 + 0.125, 1 / 3 - 0.125, -2 / 3])
    assert out[1] == advs[1]  # no reward signal: left untrained, not pushed by length
    assert length_adjusted(advs, [[10, 30, 20], [5, 9]], sig, 0.0, 40) is advs


def test_best_of_group():
    r, lens = [0.5, 1.0, 1.0, 0.2], [3, 9, 4, 1]
    assert best_of_group(r, lens, 1, prefer_short=False) == [1]  # first of the tied best
    assert best_of_group(r, lens, 1, prefer_short=True) == [2]  # the shorter of them
    assert best_of_group(r, lens, 3, prefer_short=True) == [2, 1, 0]


def _rollouts(lengths, finish=None):
    """Rollouts of len(lengths) prompts whose candidates have the given response lengths."""
    P = len(lengths)
    toks = [[[7] * n for n in g] for g in lengths]
    return Rollouts([[1, 2]] * P, toks, [[""] * len(g) for g in lengths],
                    [[[-0.5] * n for n in g] for g in lengths],
                    finish or [["stop"] * len(g) for g in lengths], stats={})


def _algo(name, max_tokens=10, **kw):
    return resolve(RLConfig(algorithm=name, **kw), max_tokens)


def test_bon_sft_trains_on_each_groups_best():
    ro = _rollouts([[3, 5, 2], [4, 4], [6, 1]])
    rewards = [[0.0, 1.0, 1.0], [1.0, 1.0], [0.2, 0.9]]
    b = build_samples(_algo("bon-sft"), RLConfig(algorithm="bon-sft"), ro, rewards, 10)
    # group 2 has no signal; the ties in group 1 go to the first (sampling order)
    assert [s.num_response_tokens for s in b.samples] == [5, 1]
    assert b.metrics["sft_chosen_reward_mean"] == pytest.approx(0.95)
    cfg = RLConfig(algorithm="bon-sft", length_penalty=0.1)
    b = build_samples(_algo("bon-sft", length_penalty=0.1), cfg, ro, rewards, 10)
    assert [s.num_response_tokens for s in b.samples] == [2, 1]  # the shorter of the tie
    cfg = RLConfig(algorithm="bon-sft", sft_top_k=2)
    b = build_samples(_algo("bon-sft"), cfg, ro, rewards, 10)
    assert [s.num_response_tokens for s in b.samples] == [5, 2, 6, 1]  # in sampling order


def test_overlong_filter_and_penalty():
    ro = _rollouts([[3, 10, 4]], finish=[["stop", "length", "stop"]])
    rewards = [[1.0, 1.0, 0.0]]
    cfg = RLConfig(overlong="filter")
    b = build_samples(_algo("grpo", overlong="filter"), cfg, ro, rewards, 10)
    assert [s.num_response_tokens for s in b.samples] == [3, 4]
    assert b.metrics["overlong_filtered"] == 1 and b.metrics["overlong_frac"] == pytest.approx(1 / 3)
    # dapo's penalty (cache 10 // 5 = 2 tokens): the 10-token answer's reward 1 -> 0, so the
    # group's shaped rewards are 1, 0, 0 and the first candidate alone is above the mean
    algo = _algo("dapo")
    assert algo.overlong == "penalty" and algo.overlong_cache == 2
    b = build_samples(algo, RLConfig(algorithm="dapo"), ro, rewards, 10)
    assert b.metrics["overlong_penalty_mean"] == pytest.approx(-1 / 3)
    assert [s.advantage > 0 for s in b.samples] == [True, False, False]
    # a group that only the penalty separates trains, but has no signal for dynamic sampling
    # (DAPO keeps groups by the verifier's outcome)
    assert len(build_samples(algo, RLConfig(algorithm="dapo"), ro, [[1.0] * 3], 10).samples) == 3
    assert not build_samples(_algo("grpo"), RLConfig(), ro, [[1.0] * 3], 10).samples
    assert reward_signal([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]) == [False, True]


def test_dynamic_sampling_choice():
    assert fill_groups([False, True, True, False, True], 2) == [1, 2]
    assert fill_groups([False, True, False], 2) == [1]
    ro = _rollouts([[1], [2], [3]])
    sc = ScoreResult([[0.1], [0.2], [0.3]], [[{}], [{}], [{}]])
    ro2, sc2 = take_groups(ro, sc, [2, 0])
    assert [len(g[0]) for g in ro2.token_ids] == [3, 1] and sc2.rewards == [[0.3], [0.1]]


def test_the_table_is_the_papers():
    assert (_algo("dapo").clip_low, _algo("dapo").clip_high) == (0.2, 0.28)
    assert _algo("dapo").agg == "token-mean" and _algo("dapo").dynamic_rounds == 3
    assert (_algo("gspo").clip_low, _algo("gspo").clip_high) == (3e-4, 4e-4)
    assert _algo("grpo").agg == "seq-mean-token-mean" and _algo("grpo").advantage == "grpo"
    assert _algo("dr-grpo").agg == "token-sum-norm" and _algo("dr-grpo").advantage == "centered"
    assert _algo("rloo").advantage == "rloo" and _algo("bon-sft").loss == "sft"
    # a key the user sets wins over the algorithm's
    a = _algo("dapo", clip_high=0.4, dynamic_sampling=0, overlong="none", loss_agg="token-sum-norm")
    assert (a.clip_high, a.dynamic_rounds, a.overlong, a.agg) == (0.4, 0, "none", "token-sum-norm")
    assert _algo("grpo", std_normalize=False).advantage == "centered"
    assert set(ALGORITHMS) == {"grpo", "dr-grpo", "dapo", "gspo", "rloo", "bon-sft"}


@pytest.mark.parametrize("override, message", [
    ("rl.epochs=0", "rl.epochs: must be >= 1"),
    ("rl.minibatches=0", "rl.minibatches: must be >= 1"),
    ("rl.dual_clip=0.5", "rl.dual_clip: must be 0 (off) or > 1"),
    ("rl.loss_agg=seq-mean", "rl.loss_agg: must be auto or one of"),
    ("rl.overlong=cut", "rl.overlong: must be one of"),
    ("rl.length_penalty=2", "rl.length_penalty: must be in [0, 1]"),
    ("rl.dynamic_sampling=-1", "rl.dynamic_sampling: must be >= 0"),
])
def test_bad_rl_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=[override])


def test_settings_that_would_change_nothing_are_refused():
    with pytest.raises(ConfigError, match="rl.loss_agg"):
        RLConfig(algorithm="gspo", loss_agg="token-mean")
    with pytest.raises(ConfigError, match="rl.dual_clip"):
        RLConfig(algorithm="gspo", dual_clip=3.0)
    for algorithm in ("bon-sft", "gspo"):
        with pytest.raises(ConfigError, match="rl.kl_coef"):
            RLConfig(algorithm=algorithm, kl_coef=0.1)
    with pytest.raises(ConfigError, match="rl.sft_top_k"):
        RLConfig(algorithm="grpo", sft_top_k=2)


def test_overlong_cache_sets_the_penalty_window():
    with pytest.raises(ConfigError, match="rl.overlong_cache"):
        RLConfig(overlong_cache=5)  # grpo: no penalty, the window would change nothing
    ro = _rollouts([[3, 10, 4]], finish=[["stop", "length", "stop"]])
    for cache, penalty in ((2, -1 / 3), (5, -1 / 3), (8, -(1.0 + 0.125 + 0.25) / 3)):
        # window (10 - cache, 10]: lengths 3 and 4 are penalised only once it reaches them,
        # by (10 - cache - len) / cache
        cfg = RLConfig(algorithm="dapo", overlong_cache=cache)
        b = build_samples(resolve(cfg, 10), cfg, ro, [[1.0, 1.0, 0.0]], 10)
        assert b.metrics["overlong_penalty_mean"] == pytest.approx(penalty)
    assert RLConfig(overlong="penalty", overlong_cache=5).overlong_cache == 5
