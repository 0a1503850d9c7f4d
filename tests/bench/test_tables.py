"""bench/algorithms.py and bench/peer_trl.py: every row's settings are a valid config on top of
the demo's (a typo fails here, not ten minutes into a table), and each row changes the run."""
import json

import pytest
from bench_modules import BENCH, load

from tao_fast.cli import DEMO
from tao_fast.config import load_config

algorithms = load("algorithms")


@pytest.mark.parametrize("name", list(algorithms.ROWS))
def test_every_algorithms_row_is_a_demo_config_that_differs(name, monkeypatch):
    monkeypatch.chdir(BENCH.parent)  # the rows name files from the checkout's root
    cfg = load_config(None, algorithms.ROWS[name], base=DEMO)
    if name != "grpo":
        assert cfg != load_config(None, algorithms.ROWS["grpo"], base=DEMO), name
    if cfg.rollout.fewshot_file:
        from tao_fast.data.prompts import read_fewshot
        assert read_fewshot(cfg.rollout.fewshot_file)  # the file is there and well formed


def test_peer_trl_matches_the_demo_budget_and_renders_its_row():
    peer = load("peer_trl")
    assert (peer.PROMPTS, peer.CANDIDATES, peer.TEMPERATURE, peer.MAX_TOKENS, peer.LR) == (
        DEMO["rl.prompts_per_step"], DEMO["rollout.n"], DEMO["rollout.temperature"],
        DEMO["rollout.max_tokens"], DEMO["rl.lr"])
    held = {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 200, "mean_response_tokens": 9}
    row = {"steps": 2, "speedup": 4.0, **{
        name: {"step_seconds": [s, s], "rewards": [0.1, 0.3], "total_step_seconds": 2 * s,
               "peak_rss_mb": 2048, "held_out": held} for name, s in (("tao-fast", 1), ("trl", 4))}}
    text = peer.markdown(json.loads(json.dumps(row)))
    assert "| tao-fast | 2 | 2 s | 1.0 s | 2.0 GB | 50.0% (40.0-60.0) | 9.0 | 0.100 -> 0.300 |" \
        in text and "| trl | 2 | 8 s | 4.0 s |" in text and "4.00x its steps per second" in text
