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
