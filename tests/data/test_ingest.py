"""`tao-fast ingest` / tao_fast.data.ingest: every input format, cleaning, split, readers."""
import csv
import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tao_fast.cli import main
from tao_fast.data import ingest as ing
from tao_fast.data import logs, read_jsonl
from tao_fast.data.dedup import near_duplicates, normalize
from tao_fast.data.ingest import IngestError, ingest

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def jl(path, rows, gz=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    Path(path).write_bytes(gzip.compress(data) if gz else data)
    return path


def out_records(out, name="train.jsonl"):
    """The records of an output file; [] for one ingest did not write (nothing to put in it)."""
    path = Path(out) / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kept(out):
    return out_records(out) + out_records(out, "heldout.jsonl")


def user_texts(out):
    return sorted(r["messages"][-1]["content"] for r in kept(out))


def test_openai_request_shapes(tmp_path):
    u = {"role": "user", "content": "Name three rivers in Europe."}
    rows = [
        {"model": "gpt-4o", "messages": [{"role": "system", "content": "Be terse."}, u,
                                         {"role": "assistant", "content": "Rhine, Danube"}]},
        {"request": {"model": "m", "messages": [{"role": "developer", "content": "Rules."},
                     {"role": "user", "content": "Capital of Peru?"}]},
         "response": {"choices": [{"message": {"role": "assistant", "content": "Lima"}}]}},
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": [
             {"type": "text", "text": "Translate:"}, {"type": "text", "text": "bonjour"}]}]}},
        {"messages": [{"role": "user", "content": "Write a haiku about rain."},
                      {"role": "assistant", "content": "Drops on the window"},
                      {"role": "user", "content": "Now one about snow."},
                      {"role": "assistant", "content": "LEAKED ANSWER"}]},
        {"instructions": "Be kind.", "input": "Explain recursion to a child."},
        {"input": {"input": [{"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Responses API items"}]}]}, "output": {}},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                      {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
        {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                      {"role": "tool", "content": "3C", "tool_call_id": "c1"},
                      {"role": "user", "content": "And tomorrow?"}]},
        {"messages": [{"role": "system", "content": "only a system prompt"}]},
        # tool turns *after* the last user message are part of the answer: stripped
        {"messages": [{"role": "user", "content": "Look up the time in Lima."},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "c2"}]},
                      {"role": "tool", "content": "10:00", "tool_call_id": "c2"}]},
    ]
    s = ingest([jl(tmp_path / "log.jsonl", rows)], tmp_path / "out", heldout_frac=0.0)
    recs = {r["source"].rsplit(":", 1)[1]: r["messages"] for r in out_records(tmp_path / "out")}
    assert recs["1"] == [{"role": "system", "content": "Be terse."}, u]  # system kept, answer cut
    assert recs["2"][0] == {"role": "system", "content": "Rules."}  # developer -> system
    assert recs["3"] == [{"role": "user", "content": "Translate:\nbonjour"}]
    assert [m["content"] for m in recs["4"]] == ["Write a haiku about rain.", "Drops on the window",
                                                 "Now one about snow."]  # context kept
    assert recs["5"] == [{"role": "system", "content": "Be kind."},
                         {"role": "user", "content": "Explain recursion to a child."}]
    assert recs["6"] == [{"role": "user", "content": "Responses API items"}]
    assert recs["10"] == [{"role": "user", "content": "Look up the time in Lima."}]
    assert "LEAKED" not in (tmp_path / "out" / "train.jsonl").read_text()
    assert s.dropped == {"non-text content": 1, "tool turns": 1, "no user message": 1}
    assert s.read == 10 and s.kept == 7 and s.train == 7 and s.heldout == 0
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 7  # the library reads it back


def test_every_format_and_directories(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "logs"
    (d / "sub").mkdir(parents=True)
    jl(d / "a.jsonl", [{"prompt": "jsonl prompt"}])
    jl(d / "sub" / "b.jsonl.gz", [{"messages": [{"role": "user", "content": "gzip prompt"}]}],
       gz=True)
    jl(d / "sub" / "magic.jsonl", [{"prompt": "gzip by magic bytes"}], gz=True)
    (d / "c.csv").write_text('id,question\n1,"csv prompt, with comma"\n2,"multi\nline csv"\n')
    (d / "e.tsv").write_text("question\ttag\ntsv prompt\tx\n")
    pq.write_table(pa.table({"question": ["parquet prompt", None]}), d / "f.parquet")
    msgs = [[{"role": "system", "content": "S"}, {"role": "user", "content": "parquet chat"}]]
    pq.write_table(pa.table({"question": msgs}), d / "sub" / "g.parquet")
    (d / "notes.txt").write_text("not a prompt file")
    (d / ".hidden.jsonl").write_text("{broken\n")
    s = ingest([d], tmp_path / "out", column="question", heldout_frac=0.0)
    assert user_texts(tmp_path / "out") == sorted([
        "jsonl prompt", "gzip prompt", "gzip by magic bytes", "csv prompt, with comma",
        "multi\nline csv", "tsv prompt", "parquet prompt", "parquet chat"])
    assert s.skipped_files == [str(d / "notes.txt")]
    assert s.dropped == {"empty": 1}  # the parquet null
    assert [Path(f.path).name for f in s.files] == [
        "a.jsonl", "c.csv", "e.tsv", "f.parquet", "b.jsonl.gz", "g.parquet", "magic.jsonl"]
    srcs = {r["messages"][-1]["content"]: r["source"] for r in kept(tmp_path / "out")}
    assert srcs["multi\nline csv"] == f"{d / 'c.csv'}:3"  # the line where the row starts
    assert srcs["parquet prompt"] == f"{d / 'f.parquet'}:1"  # Parquet: the row number


def test_malformed_lines_are_reported_and_counted(tmp_path, capsys):
    rows = ['{"prompt": "fine one"}', "{broken", "", "[1, 2]", '{"foo": 1}',
            '{"messages": "nope"}', '{"messages": [{"role": "wizard", "content": "x"}]}',
            '{"prompt": 42}', '{"prompt": "fine two"}'] + ["{bad"] * 25
    path = jl(tmp_path / "x.jsonl", rows)
    s = ingest([path], tmp_path / "out")
    assert s.kept == 2 and s.read == 33  # the blank line is not a record
    assert s.dropped == {"invalid JSON": 26, "not a JSON object": 1, "no prompt": 1,
                         "bad messages": 2, "bad prompt": 1}
    assert s.malformed == 31
    assert s.files[0].malformed[:2] == [
        f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:4: not a JSON object (a JSON list)"]
    summary = json.loads((tmp_path / "out" / "ingest_summary.json").read_text())
    assert summary["files"][0]["dropped"]["invalid JSON"] == 26
    assert len(summary["files"][0]["malformed"]) == ing.N_EXAMPLES
    # the CLI prints the locations to stderr, capped, and the summary to stdout
    assert main(["ingest", str(path), "--out", str(tmp_path / "o2")]) == 0
    out, err = capsys.readouterr()
    assert f"{path}:5: no prompt" in err and "26 more malformed records" in err
    assert "kept 2" in out and "invalid JSON 26" in out


def test_exact_and_near_duplicates(tmp_path):
    long = " ".join(f"word{i} alpha beta" for i in range(60)).replace("9", "nine")
    rows = [{"prompt": "Hello, world!"}, {"prompt": "  hello   WORLD "}, {"prompt": "hello world."},
            {"prompt": "What is 2+3?"}, {"prompt": "What is 2-3?"}, {"prompt": "What is 2+4?"},
            {"prompt": "Summarise: " + long}, {"prompt": "Summarise: " + long.replace("beta", "gamma", 1)},
            {"messages": [{"role": "system", "content": "Other system"},
                          {"role": "user", "content": "Hello world"}]}]
    path = jl(tmp_path / "d.jsonl", rows)
    s = ingest([path], tmp_path / "out", heldout_frac=0.0)
    assert s.dropped == {"duplicate": 2, "near-duplicate": 1}
    texts = [r["messages"][-1]["content"] for r in out_records(tmp_path / "out")]
    assert texts[:5] == ["Hello, world!", "What is 2+3?", "What is 2-3?", "What is 2+4?",
                         "Summarise: " + long]  # first seen kept, input order
    assert len(texts) == 6  # the same question under another system prompt is another prompt
    s = ingest([path], tmp_path / "out2", near_dup_threshold=None)
    assert s.dropped == {"duplicate": 2} and s.kept == 7


def test_near_dup_guard_and_threshold():
    base = [f"tok{i}" for i in range(104)]  # 102 3-grams; one word changes 3: Jaccard 0.94
    one_word = base[:50] + ["changed"] + base[51:]
    with_number = base[:50] + ["7"] + base[51:]
    rep = near_duplicates([base, one_word, ["short", "text"], ["short", "texts"]],
                          [b"g"] * 4, threshold=0.9)
    assert rep.tolist() == [-1, 0, -1, -1]
    rep = near_duplicates([base, one_word], [b"g1", b"g2"])  # other guard: never compared
    assert rep.tolist() == [-1, -1]
    assert normalize(" ".join(with_number)) != normalize(" ".join(one_word))
    assert near_duplicates([base, base[::-1]], None, threshold=0.5).tolist() == [-1, -1]


def test_huge_fields(tmp_path, monkeypatch):
    big = "x " * (5 << 19)  # 5 MiB
    path = jl(tmp_path / "big.jsonl", [{"prompt": big}, {"prompt": "small"}])
    s = ingest([path], tmp_path / "out")
    assert s.dropped == {"too long": 1} and s.kept == 1
    field = "y" * (csv.field_size_limit() + 1000)  # over csv's default field limit
    before = csv.field_size_limit()
    (tmp_path / "big.csv").write_text(f'prompt\n"{field}"\nsmall csv\n')
    s = ingest([tmp_path / "big.csv"], tmp_path / "o2", max_chars=None, heldout_frac=0.0)
    assert s.kept == 2 and csv.field_size_limit() == before
    assert out_records(tmp_path / "o2")[0]["messages"][0]["content"] == field
    monkeypatch.setattr(logs, "MAX_LINE_BYTES", 1000)  # a line too long to even parse: skipped
    path = jl(tmp_path / "huge.jsonl", [{"prompt": "z" * 5000}, {"prompt": "after"}])
    s = ingest([path], tmp_path / "o3", heldout_frac=0.0)
    assert s.dropped == {"too long": 1} and user_texts(tmp_path / "o3") == ["after"]
    s = ingest([path], tmp_path / "o4", tokenizer=type("T", (), {"encode": str.split}),
               max_tokens=0)
    assert s.dropped == {"too long": 2}


def test_non_utf8_bytes(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "bad \xff\xfe"}\n'
                                       b'{"prompt": "lone \\ud800 escape"}\n{"prompt": "ok2"}\n')
    (tmp_path / "b.csv").write_bytes(b"prompt,n\nfine,1\n\xc3\x28 broken,2\nalso fine,3\n")
    s = ingest([tmp_path], tmp_path / "out", heldout_frac=0.0)
    assert s.dropped == {"not UTF-8": 3}
    assert user_texts(tmp_path / "out") == ["also fine", "fine", "ok", "ok2"]
    assert s.malformed_lines() == [f"{tmp_path / 'a.jsonl'}:2: not UTF-8 (byte 16)",
                                   f"{tmp_path / 'a.jsonl'}:3: not UTF-8 (a lone surrogate"
                                   + " escape in the text)",
                                   f"{tmp_path / 'b.csv'}:3: not UTF-8 (in column 'prompt')"]


def test_split_is_stable_across_rounds(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    def prompts(n):
        return [{"prompt": " ".join(rng.choice(words) for _ in range(12))} for _ in range(n)]
    first = prompts(400)
    (tmp_path / "in").mkdir()
    jl(tmp_path / "in" / "b_round1.jsonl", first)
    s1 = ingest([tmp_path / "in"], tmp_path / "r1", near_dup_threshold=None)
    side1 = {normalize(r["messages"][0]["content"]): r["id"] for r in out_records(tmp_path / "r1")}
    held1 = {normalize(r["messages"][0]["content"]) for r in out_records(tmp_path / "r1", "heldout.jsonl")}
    assert 0.04 < s1.heldout / s1.kept < 0.18
    # round 2: a new file sorts first and repeats some prompts in another case
    jl(tmp_path / "in" / "a_round2.jsonl", prompts(300) + [{"prompt": p["prompt"].upper()}
                                                           for p in first[:50]])
    ingest([tmp_path / "in"], tmp_path / "r2", near_dup_threshold=None)
    held2 = {normalize(r["messages"][0]["content"]) for r in out_records(tmp_path / "r2", "heldout.jsonl")}
    train2 = {normalize(r["messages"][0]["content"]) for r in out_records(tmp_path / "r2")}
    assert held1 <= held2 and set(side1) <= train2
    assert not held2 & train2
    # deterministic: the same input gives byte-identical output
    ingest([tmp_path / "in"], tmp_path / "r3", near_dup_threshold=None)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "r2" / name).read_bytes() == (tmp_path / "r3" / name).read_bytes()


def test_output_is_atomic(tmp_path, monkeypatch):
    path = jl(tmp_path / "p.jsonl", [{"prompt": f"prompt number {i}"} for i in range(20)])
    ingest([path], tmp_path / "out", heldout_frac=0.0)
    before = (tmp_path / "out" / "train.jsonl").read_bytes()
    calls = []

    def failing(rec):
        calls.append(rec)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return json.dumps({"messages": rec.messages})

    monkeypatch.setattr(ing, "_jsonl_line", failing)
    with pytest.raises(RuntimeError):
        ingest([path], tmp_path / "out", heldout_frac=0.0)
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "heldout.jsonl", "ingest_summary.json", "train.jsonl"]  # no temp file left


def test_unreadable_input_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.csv").write_text("text,id\nhello,1\n")
    with pytest.raises(IngestError, match=r"c\.csv: no column 'prompt' \(columns: \['text', 'id'\]\)"):
        ingest([tmp_path / "c.csv"], tmp_path / "out")
    assert main(["ingest", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "no column 'prompt'" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 100)[:40])
    with pytest.raises(IngestError, match=r"t\.jsonl\.gz: unreadable"):
        ingest([tmp_path / "t.jsonl.gz"], tmp_path / "out")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(IngestError, match=r"x\.parquet"):
        ingest([tmp_path / "x.parquet"], tmp_path / "out")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(IngestError, match="needs the 'pyarrow' package"):
        ingest([tmp_path / "x.parquet"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no .jsonl"):
        ingest([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written by a failed run
    jl(tmp_path / "dups.jsonl", ["{bad"])
    assert main(["ingest", str(tmp_path / "dups.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "no prompts kept" in capsys.readouterr().err


# ---- property tests on the readers -----------------------------------------------------------
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@FAST
@given(st.lists(TEXT, max_size=15), st.booleans())
def test_jsonl_and_csv_round_trip(prompts, gz):
    with tempfile.TemporaryDirectory() as d:
        p = jl(Path(d) / "p.jsonl", [{"prompt": t} for t in prompts], gz=gz)
        got = list(ing.read_jsonl_objects(p))
        assert [obj["prompt"] for _, obj, _ in got] == prompts
        c = Path(d) / "p.csv"
        with c.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerows([["prompt", "n"]] + [[t, i] for i, t in enumerate(prompts)])
        assert [v for _, v, e in ing.read_csv_column(c, "prompt")] == prompts


@FAST
@given(st.lists(TEXT, max_size=15))
def test_ingest_keeps_first_of_each_normalised_prompt(prompts):
    expect, seen = [], set()
    for t in prompts:
        if t.strip() and normalize(t) not in seen:
            seen.add(normalize(t))
            expect.append(t)
    with tempfile.TemporaryDirectory() as d:
        p = jl(Path(d) / "p.jsonl", [{"prompt": t} for t in prompts])
        s = ingest([p], Path(d) / "out", near_dup_threshold=None, heldout_frac=0.5)
        train = [r["messages"][0]["content"] for r in out_records(Path(d) / "out")]
        held = [r["messages"][0]["content"] for r in out_records(Path(d) / "out", "heldout.jsonl")]
        assert (Path(d) / "out" / "train.jsonl").exists() == bool(train)  # never an empty one
        assert (Path(d) / "out").exists() == bool(expect)  # nothing kept: nothing written
    assert sorted(train + held) == sorted(expect)
    assert [t for t in expect if t in set(train)] == train  # input order kept
    assert s.read == len(prompts) == s.kept + sum(s.dropped.values())


JSON = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.sampled_from(["messages", "prompt", "role", "content",
                                                       "type", "text", "request", "body"]),
                                      kids, max_size=4), max_leaves=12)


@FAST
@given(st.lists(JSON, max_size=8))
def test_ingest_never_crashes_on_arbitrary_json(objs):
    with tempfile.TemporaryDirectory() as d:
        p = jl(Path(d) / "p.jsonl", [json.dumps(o) for o in objs])
        s = ingest([p], Path(d) / "out")
        read_jsonl(Path(d) / "out" / "train.jsonl") if s.train else None
    assert s.read == len(objs) == s.kept + sum(s.dropped.values())


@FAST
@given(st.binary(max_size=300), st.sampled_from(["x.jsonl", "x.csv", "x.jsonl.gz"]))
def test_readers_report_arbitrary_bytes(data, name):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        try:
            s = ingest([p], Path(d) / "out", column="prompt")
        except IngestError as e:  # a clear, located error: corrupt gzip, CSV without the column
            assert str(p) in str(e)
            return
    assert s.read == s.kept + sum(s.dropped.values())


@FAST
@given(TEXT)
def test_normalize_is_idempotent(t):
    assert normalize(normalize(t)) == normalize(t)


def test_cli_help_lists_ingest(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ingest" in capsys.readouterr().out


# ---- reliability: malformed CSV, over-long rows, nothing kept ---------------------------------
def test_unterminated_csv_quote_is_reported_not_swallowing_rows(tmp_path):
    (tmp_path / "a.csv").write_text('prompt\n"unterminated\nrow two\nrow three\n')
    (tmp_path / "b.csv").write_text('id,prompt\n1,fine\n2,"unterminated, then\n3,next row\n'
                                    '4,"quoted row"\n5,"multi\nline, kept"\n')
    s = ingest([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "out", heldout_frac=0.0)
    assert user_texts(tmp_path / "out") == sorted(["row two", "row three", "fine", "next row",
                                                   "quoted row", "multi\nline, kept"])
    assert s.dropped == {"bad CSV row": 2} and s.malformed == 2 and s.kept == 6
    assert s.malformed_lines() == [
        f"{tmp_path / 'a.csv'}:2: bad CSV row (unexpected end of data; rows after its first line "
        "read again)",
        f"{tmp_path / 'b.csv'}:3: bad CSV row (',' expected after '\"'; rows after its first line "
        "read again)"]
    srcs = {r["messages"][-1]["content"]: r["source"] for r in kept(tmp_path / "out")}
    assert srcs["row two"] == f"{tmp_path / 'a.csv'}:3" and srcs["next row"].endswith("b.csv:4")


def test_csv_rereads_are_bounded(tmp_path, monkeypatch):
    rows = "".join(f'"open {i}\n' for i in range(6))  # every line opens a quote it never closes
    (tmp_path / "q.csv").write_text("prompt\n" + rows + "tail\n")
    s = ingest([tmp_path / "q.csv"], tmp_path / "out", heldout_frac=0.0)
    assert s.dropped == {"bad CSV row": 6} and user_texts(tmp_path / "out") == ["tail"]
    monkeypatch.setattr(logs, "MAX_CSV_REREADS", 2)  # then a bad row takes its lines with it:
    s = ingest([tmp_path / "q.csv"], tmp_path / "o2", heldout_frac=0.0)  # 2, 3, 4-5, 6-7
    assert s.dropped == {"bad CSV row": 4} and user_texts(tmp_path / "o2") == ["tail"]


def test_an_over_long_csv_line_drops_its_row_not_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "MAX_LINE_BYTES", 1000)
    (tmp_path / "c.csv").write_text("prompt,n\nbefore,1\n" + "z" * 5000 + ",2\n"
                                    '"multi\n' + "y" * 5000 + '",3\nafter,4\n')
    s = ingest([tmp_path / "c.csv"], tmp_path / "out", heldout_frac=0.0)
    assert s.dropped == {"too long": 2} and user_texts(tmp_path / "out") == ["after", "before"]
    assert "too long 2" in s.text()
    s = ingest([tmp_path / "c.csv"], tmp_path / "o2", heldout_frac=0.0, max_chars=3)
    assert s.dropped == {"too long": 4} and "dropped 4: too long 4" in s.text()


def test_nothing_kept_for_training_writes_no_train_file(tmp_path, capsys):
    out = tmp_path / "outs" / "week1"
    jl(tmp_path / "bad.jsonl", ["{bad", '{"prompt": ""}'])
    s = ingest([tmp_path / "bad.jsonl"], out)
    assert s.kept == 0 and not out.exists() and s.written == []  # a refusal writes nothing
    assert f"nothing written to {out}: no prompt kept" in s.text()
    jl(tmp_path / "one.jsonl", [{"prompt": "the only prompt"}])
    ingest([tmp_path / "one.jsonl"], out, heldout_frac=0.0)
    assert main(["ingest", str(tmp_path / "bad.jsonl"), "--out", str(out)]) == 1
    assert "no prompts kept" in capsys.readouterr().err
    assert [r["messages"][0]["content"] for r in out_records(out)] == ["the only prompt"]  # kept
    s = ingest([tmp_path / "one.jsonl"], out, heldout_frac=1.0)  # all held out: no train file
    assert (s.train, s.heldout) == (0, 1) and s.written == ["heldout.jsonl", "ingest_summary.json"]
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "ingest_summary.json"]
    assert "no train.jsonl written: every kept prompt is held out" in s.text()
    assert json.loads((out / "ingest_summary.json").read_text())["written"] == s.written
    jl(tmp_path / "two.jsonl", [{"prompt": "another prompt"}])  # a directory of ingest outputs
    ingest([tmp_path / "two.jsonl"], tmp_path / "outs" / "week2", heldout_frac=0.0)
    from tao_fast.config import DataConfig
    from tao_fast.data.sources import load_prompts

    train, _ = load_prompts(DataConfig(train=str(tmp_path / "outs")), seed=0)  # tune reads on
    assert [r.text for r in train] == ["another prompt"] and capsys.readouterr().err == ""


def test_prompts_of_earlier_rounds_are_dropped_as_seen(tmp_path):
    """Cross-round dedup: round 2's ingest is given round 1's outputs as `seen`; an exact and a
    near duplicate of a round-1 prompt (training or held-out) are dropped and counted."""
    long = " ".join(f"token{i} alpha beta" for i in range(40)).replace("9", "nine")
    r1 = [{"prompt": "Name a river in Peru."}, {"prompt": "Summarise: " + long},
          {"prompt": "What is 2+3?"}]
    ingest([jl(tmp_path / "w1.jsonl", r1)], tmp_path / "r1", heldout_frac=0.5)
    assert len(kept(tmp_path / "r1")) == 3
    r2 = [{"prompt": "  name a RIVER in peru "},  # exact (normalised) duplicate of round 1
          {"prompt": "Summarise: " + long.replace("beta", "gamma", 1)},  # near duplicate
          {"prompt": "What is 2+3?"},  # round 1 may have held it out: dropped all the same
          {"prompt": "What is 2+4?"}, {"prompt": "A new question."}, {"prompt": "a new question"}]
    seen = [tmp_path / "r1" / "train.jsonl", tmp_path / "r1" / "heldout.jsonl"]
    seen = [p for p in seen if p.exists()]
    s = ingest([jl(tmp_path / "w2.jsonl", r2)], tmp_path / "r2", heldout_frac=0.0, seen=seen)
    assert s.dropped == {"seen in an earlier round": 3, "duplicate": 1}
    assert s.seen_prompts == 3 and user_texts(tmp_path / "r2") == ["A new question.",
                                                                   "What is 2+4?"]
    saved = json.loads((tmp_path / "r2" / "ingest_summary.json").read_text())
    assert saved["dropped"]["seen in an earlier round"] == 3
    # a directory of earlier outputs works as well; without `seen` nothing is dropped as seen
    s = ingest([tmp_path / "w2.jsonl"], tmp_path / "r2b", heldout_frac=0.0, seen=[tmp_path / "r1"])
    assert s.dropped["seen in an earlier round"] == 3
    s = ingest([tmp_path / "w2.jsonl"], tmp_path / "r2c", heldout_frac=0.0)
    assert "seen in an earlier round" not in s.dropped and s.kept == 5
    with pytest.raises(IngestError, match="seen: .*gone.jsonl does not exist"):
        ingest([tmp_path / "w2.jsonl"], tmp_path / "r2d", seen=[tmp_path / "gone.jsonl"])


def test_the_cli_takes_earlier_rounds_as_seen(tmp_path, capsys):
    jl(tmp_path / "w1.jsonl", [{"prompt": "Name a river in Peru."}, {"prompt": "What is 2+3?"}])
    assert main(["ingest", str(tmp_path / "w1.jsonl"), "--out", str(tmp_path / "r1"),
                 "--heldout-frac", "0"]) == 0
    jl(tmp_path / "w2.jsonl", [{"prompt": "name a river in peru"}, {"prompt": "Why is ice cold?"}])
    assert main(["ingest", str(tmp_path / "w2.jsonl"), "--out", str(tmp_path / "r2"),
                 "--heldout-frac", "0", "--seen", str(tmp_path / "r1")]) == 0
    assert user_texts(tmp_path / "r2") == ["Why is ice cold?"]
    assert "seen in an earlier round" in capsys.readouterr().out
