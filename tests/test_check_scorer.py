"""The scorer measured against labels (tao_fast/scoring/check.py): the statistics worked out by
hand on tiny tables, `tao-fast check-scorer` end to end on the tiny model, the recipe's
pre-flight and labelled probe in a real 2-step tune, and the report's flag."""
import json

import pytest

import tao_fast
from tao_fast.config import ConfigError, load_config
from tao_fast.data.prompts import PromptRecord
from tao_fast.eval import wilson_interval
from tao_fast.scoring import build_scorer
from tao_fast.scoring.check import (agreement, auc, measure, oracle_accuracy, pick_accuracy,
                                    pick_correct, probe_accuracy, probe_divergence,
                                    sample_accuracy, verdict)

T, F = True, False


def test_auc_counts_ties_half_and_is_undefined_when_all_labels_are_equal():
    # pairs (correct, incorrect): (.9,.5) 1, (.9,.1) 1, (.5,.5) tie 0.5, (.5,.1) 1 -> 3.5 / 4
    assert auc([0.9, 0.5, 0.5, 0.1], [T, T, F, F]) == 0.875
    assert auc([0.1, 0.9], [T, F]) == 0.0  # the scorer prefers the wrong one
    assert auc([1.0, 1.0, 1.0], [T, F, F]) == 0.5  # a constant reward: chance
    assert auc([0.2, 0.7], [T, T]) is None and auc([0.2, 0.7], [F, F]) is None


def test_agreement_thresholds_the_reward_at_its_midpoint():
    # midpoint (0 + 1) / 2: verdicts T F T F against labels T T F F -> candidates 1 and 4 agree
    assert agreement([1, 0, 1, 0], [T, T, F, F]) == 0.5
    # rewards 2, 4, 10 (a judge's scale): midpoint 6 -> verdicts F F T vs F T T: 2 of 3
    assert agreement([2, 4, 10], [F, T, T]) == pytest.approx(2 / 3)
    assert agreement([2, 4, 10], [F, T, T], threshold=3) == 1.0
    # all rewards equal: nothing is above the midpoint, every verdict is "incorrect"
    assert agreement([0.3, 0.3, 0.3], [T, F, F]) == pytest.approx(2 / 3)


# a tiny table, 3 prompts x 3 candidates:
#   prompt 1: rewards 1 1 0, correct T F F -> top tied {1, 2}: pick 1/2; one sample 1/3
#   prompt 2: rewards 0 0 1, correct T T F -> top is the wrong one: pick 0; one sample 2/3
#   prompt 3: rewards 0 0 0, correct F T F -> all tied: pick 1/3; one sample 1/3
REWARDS = [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
CORRECT = [[T, F, F], [T, T, F], [F, T, F]]


def test_pick_sample_and_oracle_accuracy_by_hand():
    picks = [pick_correct(r, c) for r, c in zip(REWARDS, CORRECT)]
    assert picks == [0.5, 0.0, pytest.approx(1 / 3)]
    assert pick_accuracy(REWARDS, CORRECT) == pytest.approx((0.5 + 0 + 1 / 3) / 3)  # 0.278
    assert sample_accuracy(CORRECT) == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 3)  # 0.444
    assert oracle_accuracy(CORRECT) == 1.0
    assert oracle_accuracy([[F, F], [T, F]]) == 0.5


def test_measure_on_the_tiny_table_is_harmful():
    labels = [[float(c) for c in g] for g in CORRECT]
    m = measure(REWARDS, labels)
    # flattened: correct candidates score 1, 0, 0, 0; incorrect ones 1, 0, 1, 0, 0. The 1 beats
    # 3 zeros and ties 2 ones (3 + 1); each 0 ties 3 zeros (1.5): 8.5 of 4 x 5 pairs
    assert m["auc"] == pytest.approx(8.5 / 20)
    assert m["agreement"] == pytest.approx(4 / 9) and m["threshold"] == 0.5
    assert m["labelled_correct"] == pytest.approx(4 / 9) and m["candidates"] == 9
    assert m["one_sample"]["accuracy"] == pytest.approx(4 / 9)
    assert (m["one_sample"]["ci_low"], m["one_sample"]["ci_high"]) == wilson_interval(1, 3)
    assert m["scorer_pick"]["accuracy"] == pytest.approx(5 / 18)
    assert m["oracle"] == {"accuracy": 1.0, **dict(zip(("ci_low", "ci_high"),
                                                        wilson_interval(3, 3)))}
    assert m["status"] == "harmful"
    assert "less accurate than one sample" in m["verdict"]
    assert "likely to lower accuracy" in m["verdict"] and "intervals overlap" in m["verdict"]


def _figures(pick: float, one: float, a: float | None, correct: float = 0.5) -> dict:
    ci = {"ci_low": 0.0, "ci_high": 1.0}
    return {"prompts": 100, "auc": a, "labelled_correct": correct, "oracle": {"accuracy": 1.0},
            "one_sample": {"accuracy": one, **ci}, "scorer_pick": {"accuracy": pick, **ci}}


def test_verdict_rule():
    assert verdict(_figures(0.30, 0.40, 0.6))[0] == "harmful"
    assert verdict(_figures(0.41, 0.40, 0.8))[0] == "weak"  # within 2 points
    assert verdict(_figures(0.60, 0.40, 0.5))[0] == "weak"  # AUC at chance
    status, line = verdict(_figures(0.60, 0.40, 0.8))
    assert status == "useful" and "it can guide tuning" in line
    status, line = verdict(_figures(0.0, 0.0, None, correct=0.0))
    assert status == "undefined" and "no candidate is labelled correct (oracle 0%)" in line
    status, line = verdict(_figures(1.0, 1.0, None, correct=1.0))
    assert status == "undefined" and "every candidate is labelled correct" in line


def test_consensus_pick_is_the_majority_answer_scored_by_the_verifier():
    recs = [PromptRecord(messages=[{"role": "user", "content": q}])
            for q in ("What is 3 + 4?", "What is 2 + 2?")]
    texts = [["8", "8", "7"], ["4", "4", "5"]]  # a wrong majority, then a right one
    rewards = build_scorer("consensus").score(recs, texts).rewards
    labels = build_scorer("arithmetic").score(recs, texts).rewards
    m = measure(rewards, labels)
    assert m["scorer_pick"]["accuracy"] == 0.5  # the majority is right on prompt 2 only
    assert m["one_sample"]["accuracy"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["oracle"]["accuracy"] == 1.0
    assert probe_accuracy(build_scorer("arithmetic"), recs, texts) == pytest.approx(3 / 6)


def test_probe_accuracy_leaves_out_the_candidates_the_label_scorer_failed_on():
    recs = [PromptRecord(messages=[{"role": "user", "content": "q"}], meta={"answer": "7"}),
            PromptRecord(messages=[{"role": "user", "content": "q"}])]  # no answer: fails
    label = build_scorer({"type": "exact", "answer_field": "answer"})
    assert probe_accuracy(label, recs, [["7", "8"], ["7", "7"]]) == 0.5
    assert probe_accuracy(label, recs[1:], [["7"]]) is None


def _steps(rewards, probes):
    return [{"global_step": i, "reward_mean": r, "zero_signal_frac": 0.0,
             "gen_tokens_per_s": 100.0, **({} if p is None else {"probe_accuracy": p})}
            for i, (r, p) in enumerate(zip(rewards, probes), 1)]


RISING = [0.30, 0.35, 0.40, 0.45, 0.48, 0.50]


def test_probe_divergence_rule_by_hand():
    # 6 steps, thirds of 2: reward (0.30 + 0.35) / 2 = 0.325 -> (0.48 + 0.50) / 2 = 0.49, a rise
    # of 0.165 > 0.05; probe 0.08 -> 0.0625, a change <= 0: flagged
    falling = _steps(RISING, [0.08, 0.08, 0.07, 0.07, 0.065, 0.06])
    flag = probe_divergence(falling)
    assert flag.startswith("reward rising while the labelled probe is flat or falling")
    assert "0.325 -> 0.490" in flag and "8.0% -> 6.2%" in flag
    assert probe_divergence(_steps(RISING, [0.1] * 6))  # flat probe: flagged too
    assert probe_divergence(_steps(RISING, [0.08, 0.10, 0.12, 0.14, 0.16, 0.18])) is None
    # reward up only 0.04: not flagged
    assert probe_divergence(_steps([0.30, 0.30, 0.32, 0.32, 0.34, 0.34], [0.1] * 6)) is None
    assert probe_divergence(_steps(RISING[:2], [0.1, 0.05])) is None  # under 3 probe steps
    assert probe_divergence(_steps(RISING, [None] * 6)) is None  # no probe at all


def test_the_report_and_summary_flag_a_rising_reward_with_a_falling_probe(tmp_path):
    from tao_fast.report import report
    from tao_fast.summary import scorer_check_lines

    for name, probes, flagged in (("falling", [0.08, 0.08, 0.07, 0.07, 0.065, 0.06], True),
                                  ("rising", [0.08, 0.10, 0.12, 0.14, 0.16, 0.18], False)):
        d = tmp_path / name
        d.mkdir()
        ms = _steps(RISING, probes)
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in ms))
        (d / "preflight.json").write_text(json.dumps({"prompts": 32, "n": 8,
                                                      "verdict": "the pick is worse"}))
        text = report(d).read_text()
        assert ("**warning**: reward rising while the labelled probe" in text) == flagged
        assert "- pre-flight (32 held-out prompts x 8 candidates): the pick is worse" in text
        assert "- labelled probe (eval.scorer on the training candidates): first 2 " in text
        assert (d / "report" / "curves.png").stat().st_size > 0
        assert any("**warning**" in x for x in scorer_check_lines(ms, None)) == flagged
    assert scorer_check_lines(_steps(RISING, [None] * 6), None) == []


def test_probe_and_preflight_settings_are_checked():
    assert load_config(overrides=["eval.probe=off"]).eval.probe == "off"  # YAML's false
    for bad, key in (("eval.probe=on", "eval.probe"), ("eval.preflight=-1", "eval.preflight")):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[bad])


def _tiny(tiny_model, *more):
    return [f"model.path={tiny_model}", "model.ops_backend=torch", "rollout.engine=torch",
            "rollout.max_tokens=4", "run.progress=false", "run.threads=1", *more]


@pytest.mark.slow
def test_check_scorer_command_end_to_end(tmp_path, tiny_model, capsys):
    from tao_fast.cli import main

    rc = main(["check-scorer", "--prompts", "builtin:arithmetic", "--limit", "4", "--n", "3",
               "--out", str(tmp_path),
               *_tiny(tiny_model, "scoring.scorer=random", "eval.scorer=arithmetic")])
    assert rc == 0
    res = json.loads((tmp_path / "check_scorer.json").read_text())
    assert res["prompts"] == 4 and res["n"] == 3 and len(res["records"]) == 4
    for k in ("auc", "agreement", "one_sample", "scorer_pick", "oracle", "verdict", "status",
              "seconds", "labelled_correct"):
        assert k in res
    assert all(len(r["candidates"]) == len(r["labels"]) == 3 for r in res["records"])
    # a random-weight model never adds up: every label equal, AUC undefined (and said so)
    if res["auc"] is None:
        assert res["labelled_correct"] in (0.0, 1.0) and res["status"] == "undefined"
    else:
        assert 0.0 <= res["auc"] <= 1.0
    out = capsys.readouterr().out
    assert "| scorer's pick |" in out and "verdict: " in out
    # labels that split the candidates (by length): AUC is defined, within [0, 1]
    rc = main(["check-scorer", "--prompts", "builtin:arithmetic", "--limit", "6", "--n", "4",
               "--out", str(tmp_path / "len.json"),
               *_tiny(tiny_model, "scoring.scorer=random", "eval.scorer={type: length, max: 20}")])
    res = json.loads((tmp_path / "len.json").read_text())
    assert rc == 0 and 0.0 < res["labelled_correct"] < 1.0 and 0.0 <= res["auc"] <= 1.0
    assert res["candidates"] == 24
    assert main(["check-scorer", *_tiny(tiny_model, "scoring.scorer=random")]) == 2  # no labels
    # no --prompts: the run's held-out set (here the builtin task's split, data.n_eval of them)
    rc = main(["check-scorer", "--out", str(tmp_path / "default.json"),
               *_tiny(tiny_model, "scoring.scorer=consensus", "eval.scorer=arithmetic",
                      "data.n_eval=2", "rollout.n=2")])
    res = json.loads((tmp_path / "default.json").read_text())
    assert rc == 0 and res["prompts"] == 2 and res["n"] == 2  # n: rollout.n


def _tune_overrides(tiny_model, out, *more):
    return _tiny(tiny_model, "data.train=builtin:arithmetic", "data.n_train=8", "data.n_eval=3",
                 "scoring.scorer=consensus", "eval.scorer=arithmetic", "eval.preflight=2",
                 "rollout.n=2", "eval.max_tokens=3", "eval.samples=0", "eval.before=false",
                 "eval.after=false", "rl.prompts_per_step=2", "run.steps=2",
                 f"run.output_dir={out}", *more)


@pytest.mark.slow
def test_a_tune_runs_the_preflight_and_the_labelled_probe(tmp_path, tiny_model):
    run = tmp_path / "run"
    tao_fast.tune(load_config(overrides=_tune_overrides(tiny_model, run)))
    pre = json.loads((run / "preflight.json").read_text())
    assert pre["prompts"] == 2 and pre["n"] == 2 and pre["verdict"]
    assert pre["scorer"] == "consensus" and pre["label_scorer"] == "arithmetic"
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(ms) == 2 and all(0.0 <= m["probe_accuracy"] <= 1.0 for m in ms)
    assert "- pre-flight (2 held-out prompts x 2 candidates): " in (run / "summary.md").read_text()
    # a resumed run keeps its pre-flight
    stamp = (run / "preflight.json").stat().st_mtime_ns
    tao_fast.tune(overrides=["run.rounds=2"], resume=run)
    assert (run / "preflight.json").stat().st_mtime_ns == stamp
    # eval.probe=off and eval.preflight=0: neither happens
    off = tmp_path / "off"
    tao_fast.tune(load_config(overrides=_tune_overrides(tiny_model, off, "eval.probe=off",
                                                        "eval.preflight=0")))
    ms = [json.loads(x) for x in (off / "metrics.jsonl").read_text().splitlines()]
    assert len(ms) == 2 and not any("probe_accuracy" in m for m in ms)
    assert not (off / "preflight.json").exists()


def test_check_scorer_help_and_its_errors_are_one_clear_line(capsys, tmp_path):
    from tao_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["check-scorer", "--help"])
    assert e.value.code == 0 and "the scorer's pick" in capsys.readouterr().out
    for argv, msg in ((["scoring.scorer=consensus"], "eval.scorer: check-scorer measures"),
                      (["--limit", "0", "eval.scorer=arithmetic"], "--limit and --n must be >= 1"),
                      (["--out", str(tmp_path / "no" / "x.json"), "eval.scorer=arithmetic"],
                       "cannot write there"),
                      (["--prompts", str(tmp_path / "none.jsonl"), "eval.scorer=arithmetic"],
                       "none.jsonl")):
        assert main(["check-scorer", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


def test_the_preflight_takes_prompts_spread_over_the_held_out_set():
    from tao_fast.tuning import spread

    held = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]  # a mix: task a, then b
    assert spread(held, 4) == ["a0", "a3", "b0", "b3"]
    assert spread(held, 20) == held and spread(held, 1) == ["a0"]
