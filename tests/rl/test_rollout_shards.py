"""Splitting a step's prompts over ranks and merging the slices back
(tao_fast/rl/rollout_shards.py), on hand-made parts; the gather itself runs on 2 gloo ranks in
test_distributed.py."""
from tao_fast.rl import rollout_shards
from tao_fast.rollout import Rollouts


def test_shard_range_covers_every_item_once():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [rollout_shards.shard_range(n, world, r) for r in range(world)]
            items = [i for lo, hi in parts for i in range(lo, hi)]
            assert items == list(range(n))  # contiguous, in order: groups stay whole
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def _part(first: int, n_prompts: int, seconds: float, **stats) -> Rollouts:
    """n_prompts prompts [first, ...], 2 candidates each of (prompt id, candidate) tokens."""
    ids = list(range(first, first + n_prompts))
    return Rollouts([[p] for p in ids], [[[p, c] for c in range(2)] for p in ids],
                    [[f"p{p}c{c}" for c in range(2)] for p in ids],
                    [[[-0.5, -0.25] for _ in range(2)] for _ in ids],
                    [["stop", "length"] for _ in ids],
                    stats={"tokens": 4 * n_prompts, "seconds": seconds, **stats})


def test_concat_rollouts_keeps_prompt_order_and_merges_stats():
    a, b, c = _part(0, 2, 2.0, peak_memory_mb=100.0), _part(2, 1, 4.0), Rollouts.empty()
    got = rollout_shards.concat_rollouts([a, b, c])
    assert got.prompt_ids == [[0], [1], [2]]
    assert got.token_ids == [[[0, 0], [0, 1]], [[1, 0], [1, 1]], [[2, 0], [2, 1]]]
    assert got.texts == [["p0c0", "p0c1"], ["p1c0", "p1c1"], ["p2c0", "p2c1"]]
    assert got.logprobs == [[[-0.5, -0.25]] * 2] * 3
    assert got.finish_reasons == [["stop", "length"]] * 3
    # 8 + 4 + 0 tokens; the slices ran side by side: the slowest one's 4 s, the largest memory
    assert got.stats == {"tokens": 12, "seconds": 4.0, "tokens_per_s": 3.0,
                         "peak_memory_mb": 100.0}
    assert "peak_memory_mb" not in rollout_shards.concat_rollouts([b, c]).stats
    # batches one after another (a step's dynamic-sampling rounds): 2 + 4 s, 12 / 6 tokens/s
    seq = rollout_shards.concat_rollouts([a, b, c], one_after_another=True)
    assert seq.stats == {"tokens": 12, "seconds": 6.0, "tokens_per_s": 2.0, "peak_memory_mb": 100.0}
    assert rollout_shards.concat_rollouts([c, c]).stats == {"tokens": 0, "seconds": 0.0,
                                                            "tokens_per_s": 0.0}
