import json

import pytest

from tao_fast.data import PromptFileError, read_jsonl


def test_reads_prompt_and_messages(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "What is 2 + 2?", "id": 7}) + "\n\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "leaked answer"}]}) + "\n")
    recs = read_jsonl(f)
    assert recs[0].text == "What is 2 + 2?" and recs[0].meta == {"id": 7}
    assert [m["role"] for m in recs[1].messages] == ["system", "user"]  # answer stripped


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"text": "x"}', "needs 'prompt' or 'messages'"),
    ('{"prompt": ""}', "non-empty string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages\\[0\\]"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(PromptFileError, match=rf"bad\.jsonl:2: .*{message}"):
        read_jsonl(f)


def test_non_utf8_and_empty(tmp_path):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(PromptFileError, match=r"bin\.jsonl:2: not UTF-8"):
        read_jsonl(f)
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        read_jsonl(e)


def test_gzip_prompt_files_are_read(tmp_path):
    import gzip

    body = (json.dumps({"prompt": "zipped"}) + "\n").encode()
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "magic.jsonl").write_bytes(gzip.compress(body))  # gzip without the suffix
    for name in ("p.jsonl.gz", "magic.jsonl"):
        assert [r.text for r in read_jsonl(tmp_path / name)] == ["zipped"]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(body * 50)[:30])
    with pytest.raises(PromptFileError, match=r"cut\.jsonl\.gz: not a readable gzip file"):
        read_jsonl(tmp_path / "cut.jsonl.gz")


def test_every_answer_after_the_last_user_message_is_dropped(tmp_path):
    f = tmp_path / "p.jsonl"
    turns = [("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
             ("assistant", "LEAK one"), ("assistant", "LEAK two"), ("system", "LEAK three")]
    f.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    (rec,) = read_jsonl(f)
    assert [m["content"] for m in rec.messages] == ["S", "Q1", "A1", "Q2"]


def test_a_line_over_the_bound_is_an_error_read_no_further(tmp_path, monkeypatch):
    from tao_fast.data import prompts

    monkeypatch.setattr(prompts, "MAX_LINE_BYTES", 100)
    f = tmp_path / "big.jsonl"
    f.write_text('{"prompt": "ok"}\n' + json.dumps({"prompt": "x" * 500}) + "\n")
    with pytest.raises(PromptFileError, match=r"big\.jsonl:2: line over 100 bytes"):
        read_jsonl(f)


def test_prompt_directory_reads_gzip_and_names_what_it_skips(tmp_path, capsys):
    import gzip

    from tao_fast.config import DataConfig
    from tao_fast.data.sources import load_prompts

    d = tmp_path / "prompts"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"prompt": "plain"}\n')
    (d / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "zipped"}\n'))
    (d / "c.json").write_text('{"prompt": "a .json file"}\n')
    (d / "notes.txt.gz").write_bytes(gzip.compress(b"x"))
    (d / "empty.jsonl").write_text("\n")  # an ingest that kept nothing, or a blank export
    (d / "heldout.jsonl").write_text('{"prompt": "held out"}\n')
    (d / "ingest_summary.json").write_text("{}")
    train, held = load_prompts(DataConfig(train=str(d)), seed=0)
    assert [r.text for r in train] == ["plain", "zipped"] and held == []
    err = capsys.readouterr().err
    assert f"skipped 2 file(s) that are not *.jsonl or *.jsonl.gz: {d / 'c.json'}, " \
           f"{d / 'notes.txt.gz'}\n" in err
    assert f"{d / 'empty.jsonl'} holds no prompts: skipped" in err
    assert "heldout" not in err and "ingest_summary" not in err
    for f in ("a.jsonl", "sub/b.jsonl.gz"):
        (d / f).unlink()
    with pytest.raises(PromptFileError, match=r"no prompts in .*prompts: every prompt file "
                                              r"there is empty \(.*empty\.jsonl\)"):
        load_prompts(DataConfig(train=str(d)), seed=0)
    with pytest.raises(PromptFileError, match=r"empty\.jsonl: no prompts in file"):
        load_prompts(DataConfig(train=str(d / "empty.jsonl")), seed=0)  # a file named alone
