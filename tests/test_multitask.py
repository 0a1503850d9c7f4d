"""Several tasks in one run: the route scorer trains each record by its task's scorer, and the
held-out evaluation and summary break accuracy down per task (data.task_field), with the
worst task's change."""
import json

import pytest

import tao_fast
from tao_fast.config import load_config
from tao_fast.data import PromptRecord
from tao_fast.eval import NO_TASK, by_task, wilson_interval
from tao_fast.summary import task_lines


def test_by_task_splits_the_figures_by_hand():
    recs = [PromptRecord([{"role": "user", "content": "q"}], meta) for meta in
            ({"task": "a"}, {"task": "a"}, {"task": "b"}, {}, {"task": "a"})]
    acc = [1.0, 0.0, 1.0, 0.5, 1.0]
    score = [1.0, 0.2, 0.9, 0.5, 0.4]
    lens = [[4], [6], [3], [10, 20], [2]]
    got = by_task(recs, acc, score, lens, "task")
    assert sorted(got) == [NO_TASK, "a", "b"]
    lo, hi = wilson_interval(2, 3)
    assert got["a"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "ci_low": lo, "ci_high": hi,
                        "mean_score": pytest.approx(1.6 / 3), "mean_response_tokens": 4.0}
    assert got[NO_TASK]["mean_response_tokens"] == 15.0 and got["b"]["n"] == 1
    assert by_task(recs, acc, score, lens, "domain") == {}  # no record names one: no table


def test_task_lines_give_each_tasks_change_and_the_worst():
    def by(**accs):  # EvalResult.by_task
        return {t: {"n": 10, "accuracy": a, "ci_low": a - 0.1, "ci_high": a + 0.1,
                    "mean_score": a, "mean_response_tokens": 5.0} for t, a in accs.items()}

    lines = task_lines(by(math=0.2, sql=0.5), by(math=0.6, sql=0.4))
    assert "| math | 10 | 20.0% (10.0-30.0), score 0.200 | 60.0% (50.0-70.0), score 0.600 | " \
           "+40.0 points | 5.0 |" in lines
    assert lines[-1] == "- worst task: sql (-10.0 points)"
    assert task_lines({}, None) == []
    assert task_lines(None, by(chat=0.5))[-1].startswith("| chat | 10 |  | 50.0%")


def test_a_two_task_tune_routes_scores_and_reports_per_task(tmp_path, tiny_model):
    rows = [{"prompt": f"What is {a} + {b}?", "task": "math"} for a, b in ((1, 2), (3, 4))] + \
           [{"prompt": f"Say a word about {w}.", "task": "chat"} for w in ("tea", "owls")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:3]))
    cfg = load_config(overrides=[
        f"model.path={tiny_model}", "model.ops_backend=torch", "rollout.engine=torch",
        f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'held.jsonl'}",
        "scoring.scorer={type: route, field: task, routes: {math: arithmetic, "
        "chat: {type: length, min: 1}}}",
        "rollout.n=2", "rollout.max_tokens=3", "eval.max_tokens=3", "eval.samples=0",
        "rl.prompts_per_step=4", "run.steps=1", "run.threads=1", "run.progress=false",
        "run.keep_states=0", f"run.output_dir={tmp_path / 'run'}"])
    res = tao_fast.tune(cfg)
    (m,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"route/math/reward_mean", "route/chat/reward_mean"} <= set(m)
    for r in (res.eval_before, res.eval_after):
        assert sorted(r.by_task) == ["chat", "math"] and r.by_task["math"]["n"] == 1
        assert [x["route"] for x in r.records] == ["math", "chat"]
    saved = json.loads((tmp_path / "run" / "eval_after.json").read_text())
    assert saved["by_task"] == res.eval_after.by_task
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| task | n | held-out before (95% CI) |" in summary and "- worst task: " in summary
    from tao_fast.report import report

    text = report(tmp_path / "run").read_text()
    assert "| chat | 1 | " in text and "- worst task: " in text
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["after"]["by_task"]


def test_the_report_draws_each_tasks_reward_curve(tmp_path):
    from tao_fast.report import report, task_curves

    ms = [{"global_step": i, "reward_mean": 0.5, "zero_signal_frac": 0.0, "gen_tokens_per_s": 9.0,
           "route/math/reward_mean": 0.1 * i, "route/chat/reward_mean": 1.0 - 0.1 * i}
          for i in (1, 2, 3)]
    assert task_curves(ms) == {"math": [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))],
                               "chat": [(1, 0.9), (2, 0.8), (3, 0.7)]}
    assert task_curves([{"reward_mean": 1.0}]) == {}  # no route scorer: no plot
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in ms))
    md = report(tmp_path).read_text()
    assert "![reward per task](report/tasks.png)" in md
    assert (tmp_path / "report" / "tasks.png").is_file()
