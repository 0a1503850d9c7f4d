"""The report and the scaling experiment: numbers in the markdown come from the run's files,
plots are real PNGs, FLOPs and parameter counts are worked out by hand, and a tiny real
`scale` run produces every artefact."""
import json

import pytest

from tao_fast.report import report, time_split
from tao_fast.scale import _param_count, render_scale, scale, tuning_flops

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(d, evals=True):
    d.mkdir()
    ms = [{"round": 1, "step": i, "global_step": i, "reward_mean": r, "zero_signal_frac": z,
           "gen_tokens": 100, "gen_tokens_per_s": 200.0, "gen_seconds": 0.5,
           "score_seconds": 0.1, "train_seconds": 1.0, "sync_seconds": 0.1, "step_seconds": 2.0,
           "train_tokens": 300, "train_tokens_per_s": 300.0, "kl": 0.0,
           "sampler_logprob_abs_diff": 0.01, "sampler_ratio_outside": 0.02,
           "score_failures": f, **({"score_failures/sql": f} if f else {}),
           "consensus/majority_rate": 0.5}
          for i, (r, z, f) in enumerate([(0.1, 0.5, 0), (0.3, 0.25, 2), (0.5, 0.0, 1),
                                         (0.7, 0.0, 0)], 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in ms))
    (d / "config.yaml").write_text("model: {path: embedded}\nrollout: {n: 8, temperature: 0.7}\n"
                                   "rl: {prompts_per_step: 8}\nscoring: {scorer: arithmetic}\n")
    if evals:
        for name, acc, toks in (("before", 0.105, 20.0), ("after", 0.6, 12.5),
                                ("after_sampled", 0.4, 13.0)):
            (d / f"eval_{name}.json").write_text(json.dumps(
                {"n": 200, "mean_score": acc, "accuracy": acc, "ci_low": acc - 0.05,
                 "ci_high": acc + 0.05, "mean_response_tokens": toks, "seconds": 1.0}))
    (d / "manifest.jsonl").write_text(json.dumps(
        {"round": 1, "new_files": [{"path": "a"}], "n_new": 64, "n_replay": 0}) + "\n")
    return ms


def test_report_numbers_and_plots(tmp_path):
    d = tmp_path / "run"
    ms = fake_run(d)
    md = report(d).read_text()
    assert "| before | 10.5% (5.5-15.5) | - | 0.105 | 20.0 |" in md
    assert "| after | 60.0% (55.0-65.0) | 40.0% (35.0-45.0) | 0.600 | 12.5 |" in md
    assert "+49.5 points" in md and "20.0 -> 12.5" in md
    assert "first 1 steps 0.100, last 1 steps 0.700" in md
    assert "scoring failures: sql 3" in md
    assert "consensus/majority_rate: mean 0.500 over 4 steps" in md
    assert "| 1 | 1 | 64 | 0 |" in md
    # 4 steps x 2.0 s: 0.5 generation, 0.1 scoring, 1.0 training, 0.1 sync, 0.3 other
    split = time_split(ms)
    assert split == pytest.approx({"generation": 2.0, "scoring": 0.4, "training": 4.0,
                                   "weight sync": 0.4, "other": 1.2})
    assert "| training | 4.0 | 50% |" in md
    for name in ("heldout", "curves", "throughput", "time_split"):
        png = (d / "report" / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 5000, name
        assert f"report/{name}.png" in md


def test_report_without_evals_and_bad_dirs(tmp_path):
    d = tmp_path / "run"
    fake_run(d, evals=False)
    md = report(d).read_text()
    assert "Held-out" not in md and not (d / "report" / "heldout.png").exists()
    with pytest.raises(FileNotFoundError, match="not a tao-fast run"):
        report(tmp_path)
    (d / "metrics.jsonl").write_text('{"step": 1}\n{broken\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        report(d)


def test_param_count_and_flops(tmp_path, embedded):
    model, _, path = embedded
    hf = json.loads((path / "config.json").read_text())
    assert _param_count(hf) == sum(p.numel() for p in model.parameters())
    d = tmp_path / "run"
    fake_run(d)
    assert tuning_flops(d, 1000) == 2 * 1000 * 400 + 6 * 1000 * 1200


def test_render_scale_by_hand():
    a = {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 100, "mean_response_tokens": 9.0}
    md = render_scale({"before": a, "runs": [{"n": 4, "after": a, "flops": 1.5e12,
                                              "wall_seconds": 90}],
                       "random": {"n": 4, "after": a, "flops": 2e12},
                       "best_of_n": {"4": a}})
    assert "| 4 | 50.0% (40.0-60.0) | 9.0 | 1.50e+12 | 1.5 min | 50.0% (40.0-60.0) |" in md
    assert "Random-scorer control at N=4" in md


@pytest.mark.slow
def test_tiny_scale_run_end_to_end(tmp_path, monkeypatch, tiny_model):
    from tao_fast.cli import DEMO
    from tao_fast.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.n_eval=4", "data.n_train=16", "run.steps=1",
                             "rl.prompts_per_step=2", "rollout.max_tokens=8", "rollout.engine=torch",
                             "eval.max_tokens=8", "run.progress=false", "model.ops_backend=torch",
                             f"model.path={tiny_model}"],
                      base=DEMO)
    res = scale(cfg, [3, 2], "sc")
    assert res["ns"] == [2, 3] and [r["n"] for r in res["runs"]] == [2, 3]
    for d in ("n2", "n3", "random-n3"):
        assert (tmp_path / "sc" / d / "checkpoint-round1").exists(), d
    assert (tmp_path / "sc" / "n3" / "eval_before.json").exists()  # copied from n2
    assert set(res["best_of_n"]) == {"2", "3"} and res["random"]["n"] == 3
    assert res["runs"][1]["flops"] > res["runs"][0]["flops"] > 0  # more candidates, more work
    assert (tmp_path / "sc" / "scaling.png").read_bytes().startswith(PNG)
    assert "| 2 |" in (tmp_path / "sc" / "scale.md").read_text()
    again = scale(cfg, [2, 3], "sc")  # finished runs are reused, not redone
    assert again["runs"][0]["wall_seconds"] == res["runs"][0]["wall_seconds"]


def test_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path, capsys):
    d = tmp_path / "run"
    ms = fake_run(d)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"round": 1, "step": 5, "reward_m')  # killed mid-write: no newline
    md = report(d).read_text()
    assert "first 1 steps 0.100, last 1 steps 0.700" in md and f"{len(ms)} steps" in md
    assert f"warning: {d / 'metrics.jsonl'}:5: a torn last line" in capsys.readouterr().err


@pytest.mark.parametrize("name, text, message", [
    ("metrics.jsonl", '{"step": 1}\n{broken\n{"step": 3}\n', r"metrics\.jsonl:2: not JSON"),
    ("metrics.jsonl", '{"reward_mean": 0.5, "zero_signal_frac": 0}\n',
     r"metrics\.jsonl:1: no field 'gen_tokens_per_s'"),
    ("eval_after.json", '{"n": 200, "accuracy": 0.6', r"eval_after\.json: not JSON"),
    ("eval_after.json", '{"n": 200, "accuracy": 0.6, "ci_low": 0.5, "ci_high": 0.7, '
                        '"mean_score": 0.6}', r"eval_after\.json: no field 'mean_response_tokens'"),
    ("eval_before.json", '{"n": 200, "accuracy": "high", "ci_low": 0.5, "ci_high": 0.7, '
                         '"mean_score": 0.6, "mean_response_tokens": 3}',
     r"eval_before\.json: field 'accuracy' is 'high', not a number"),
    ("manifest.jsonl", '{"round": 1, "new_files": [], "n_new": 6}\n',
     r"manifest\.jsonl:1: no field 'n_replay'"),
    ("manifest.jsonl", '{"round": 1,\n', r"manifest\.jsonl:1: not JSON"),
    ("config.yaml", "rl: [unclosed\n", r"config\.yaml:2: not YAML"),
    ("config.yaml", "rl: 3\n", r"config\.yaml: not a run config \('rl' is not a section"),
    ("config.yaml", b"model: {path: caf\xe9}\n", r"config\.yaml:1: not UTF-8"),
])
def test_corrupt_run_files_are_one_line_naming_the_file(tmp_path, capsys, name, text, message):
    from tao_fast.cli import main
    from tao_fast.config import ConfigError

    d = tmp_path / "run"
    fake_run(d)
    (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        report(d)
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tao-fast: error: {d / name}") and err.count("\n") == 1
