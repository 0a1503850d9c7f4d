"""The RL algorithms tao-fast trains with, each as its paper defines it, declared once as data.

Every algorithm is the same four choices: how a group's rewards become advantages, which loss
turns advantages into a gradient, how the loss is aggregated over tokens, and its clip range;
DAPO adds dynamic sampling and the soft overlong penalty. `rl.*` keys left at None / "auto"
take the algorithm's values from ALGORITHMS; a key the user sets wins.

| algorithm | advantage              | loss              | aggregation                 | clip (low, high) |
| --------- | ---------------------- | ----------------- | --------------------------- | ---------------- |
| grpo      | (r - mean) / std       | PPO clip, per token | mean of per-sequence token means | 0.2, 0.2   |
| dr-grpo   | r - mean               | PPO clip, per token | token sum / (max_tokens x sequences) | 0.2, 0.2 |
| dapo      | (r - mean) / std       | PPO clip, per token | token mean over the batch | 0.2, 0.28 (clip-higher) |
| gspo      | (r - mean) / std       | PPO clip on the sequence ratio (length-normalised) | mean over sequences | 3e-4, 4e-4 |
| rloo      | r - mean of the others | PPO clip, per token | mean of per-sequence token means | 0.2, 0.2   |
| bon-sft   | (none: each group's top-scored candidate(s)) | log-likelihood | token mean | - |

Sources: GRPO (Shao et al. 2024, DeepSeekMath, eq. 3), Dr.GRPO (Liu et al. 2025, "Understanding
R1-Zero-Like Training": no std, no per-response length normaliser, a constant instead), DAPO
(Yu et al. 2025: clip-higher 0.28, token-level loss, dynamic sampling, overlong reward shaping),
GSPO (Zheng et al. 2025: sequence-level ratio exp(mean_t log-ratio), clip 3e-4 / 4e-4), RLOO
(Ahmadian et al. 2024), best-of-N rejection-sampling fine-tuning (RFT/RAFT).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    advantage: str  # grpo (std-normalised) | centered (no std) | rloo | none (bon-sft)
    loss: str  # ppo (token-level clipped ratio) | gspo (sequence ratio) | sft (log-likelihood)
    agg: str  # token-mean | seq-mean-token-mean | token-sum-norm (Dr.GRPO's constant)
    clip: tuple[float, float]
    dynamic_rounds: int = 0  # extra generation rounds to fill the batch with signal groups
    overlong: str = "none"  # none | filter (truncated candidates out of the loss) | penalty


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm("grpo", "ppo", "seq-mean-token-mean", (0.2, 0.2)),
    "dr-grpo": Algorithm("centered", "ppo", "token-sum-norm", (0.2, 0.2)),
    # DAPO's batch was filled within 3 extra rounds in most steps of its runs; a bound keeps a
    # task where most groups are solved (or none are) from sampling forever
    "dapo": Algorithm("grpo", "ppo", "token-mean", (0.2, 0.28), dynamic_rounds=3,
                      overlong="penalty"),
    "gspo": Algorithm("grpo", "gspo", "seq-mean", (3e-4, 4e-4)),
    "rloo": Algorithm("rloo", "ppo", "seq-mean-token-mean", (0.2, 0.2)),
    "bon-sft": Algorithm("none", "sft", "token-mean", (0.0, 0.0)),
}

# aggregations a user may choose with rl.loss_agg for each loss (gspo's is its definition)
LOSS_AGGS = {"ppo": ("token-mean", "seq-mean-token-mean", "token-sum-norm"),
             "gspo": ("seq-mean",), "sft": ("token-mean", "seq-mean-token-mean")}


@dataclass(frozen=True)
class Resolved:
    """One run's algorithm with every "auto" / None key of the rl section filled in."""
    name: str
    advantage: str
    loss: str
    agg: str
    clip_low: float
    clip_high: float
    dynamic_rounds: int
    overlong: str
    overlong_cache: int  # tokens before max_tokens where the soft overlong penalty starts


def resolve(rl, max_tokens: int) -> Resolved:
    """The algorithm rl.algorithm names, with the rl section's explicit keys applied.
    `rl` is an RLConfig; max_tokens is rollout.max_tokens (the overlong window's end)."""
    a = ALGORITHMS[rl.algorithm]
    advantage = a.advantage
    if advantage == "grpo" and not rl.std_normalize:
        advantage = "centered"
    overlong = a.overlong if rl.overlong == "auto" else rl.overlong
    # DAPO used a 4k-token window at 20k max (1/5); at least one token
    cache = rl.overlong_cache or max(1, max_tokens // 5)
    return Resolved(
        name=rl.algorithm, advantage=advantage, loss=a.loss,
        agg=a.agg if rl.loss_agg == "auto" else rl.loss_agg,
        clip_low=a.clip[0] if rl.clip_low is None else rl.clip_low,
        clip_high=a.clip[1] if rl.clip_high is None else rl.clip_high,
        dynamic_rounds=a.dynamic_rounds if rl.dynamic_sampling is None else rl.dynamic_sampling,
        overlong=overlong, overlong_cache=min(cache, max_tokens))
