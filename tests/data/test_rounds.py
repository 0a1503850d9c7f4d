"""Rounds over a prompt directory, and what a resume checks before it rebuilds a round's pool:
a manifest that covers the saved state, prompt files unchanged. Each refusal is one
ResumeError naming the file."""
import json

import pytest

from tao_fast.cli import main
from tao_fast.config import ResumeError
from tao_fast.data.rounds import plan_round, pool_from_manifest, read_manifest


def prompts(path, *texts):
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def saved_run(tmp_path, rounds=1):
    """A run directory as tune leaves it: manifest.jsonl and a training state in round
    `rounds` (state/latest -> state/step-000002/state.json)."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run.mkdir()
    prompts(data / "week1.jsonl", "a", "b", "c")
    manifest = [plan_round(1, str(data), [], 0.25, 0).manifest_line()]
    if rounds == 2:
        prompts(data / "week2.jsonl", "d", "e")
        manifest.append(plan_round(2, str(data), manifest, 0.25, 0).manifest_line())
    (run / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    (run / "state" / "step-000002").mkdir(parents=True)
    (run / "state" / "step-000002" / "state.json").write_text(json.dumps({"round": rounds}))
    (run / "state" / "latest").write_text("step-000002")
    return data, run


def test_resume_refuses_a_changed_or_removed_prompt_file(tmp_path):
    data, run = saved_run(tmp_path, rounds=2)
    assert [m["round"] for m in read_manifest(run)] == [1, 2]  # unchanged: fine
    prompts(data / "week1.jsonl", "a", "b", "c", "appended")
    with pytest.raises(ResumeError, match=rf"resume: {data / 'week1.jsonl'} changed since round 1 "
                                          rf"read it \(48 -> 71 bytes, sha256 "):
        read_manifest(run)
    (data / "week1.jsonl").unlink()
    with pytest.raises(ResumeError, match=rf"{data / 'week1.jsonl'}, read by round 1, is gone"):
        read_manifest(run)


def test_resume_refuses_a_missing_short_or_corrupt_manifest(tmp_path):
    data, run = saved_run(tmp_path, rounds=2)
    lines = (run / "manifest.jsonl").read_text().splitlines()
    (run / "manifest.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(ResumeError, match=r"manifest\.jsonl holds 1 round\(s\), but the run's "
                                          r"saved training state is in round 2"):
        read_manifest(run)
    (run / "manifest.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    with pytest.raises(ResumeError, match=r"manifest\.jsonl:2: not JSON"):
        read_manifest(run)
    (run / "manifest.jsonl").write_text(lines[0] + '\n{"round": 2}\n')
    with pytest.raises(ResumeError, match=r"manifest\.jsonl:2: not a manifest line \(no "
                                          r"new_files, prompt_ids\)"):
        read_manifest(run)
    (run / "manifest.jsonl").unlink()
    with pytest.raises(ResumeError, match=r"manifest\.jsonl is missing, but the run's saved "
                                          r"training state is in round 2"):
        read_manifest(run)
    (run / "state" / "latest").unlink()  # no saved state: a new start, nothing to rebuild
    assert read_manifest(run) == []


def test_pool_from_manifest_raises_resume_error(tmp_path):
    data, run = saved_run(tmp_path)
    line = read_manifest(run)[0]
    assert [r.text for r in pool_from_manifest(line, str(data))] == ["a", "b", "c"]
    prompts(data / "week1.jsonl", "a", "b", "z")
    with pytest.raises(ResumeError, match=r"1 prompts of round 1 are no longer in"):
        pool_from_manifest(line, str(data))


def test_cli_resume_after_a_prompt_file_changed_is_one_line(tmp_path, capsys, tiny_model):
    data, run = saved_run(tmp_path)
    (run / "config.yaml").write_text(f"data: {{train: {data}}}\nrun: {{steps: 5}}\n"
                                     f"model: {{path: {tiny_model}}}\n")
    prompts(data / "week1.jsonl", "a", "b", "changed")
    assert main(["tune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tao-fast: error: resume: ") and "changed since round 1" in err
    assert err.count("\n") == 1


def test_an_empty_file_is_not_used_until_it_has_prompts(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    prompts(data / "a.jsonl", "a", "b")
    (data / "b.jsonl").write_text("")
    r1 = plan_round(1, str(data), [], 0.0, 0)
    assert [f["path"].rsplit("/", 1)[1] for f in r1.new_files] == ["a.jsonl"] and r1.n_new == 2
    prompts(data / "b.jsonl", "c")
    r2 = plan_round(2, str(data), [r1.manifest_line()], 0.0, 0)
    assert [f["path"].rsplit("/", 1)[1] for f in r2.new_files] == ["b.jsonl"] and r2.n_new == 1
