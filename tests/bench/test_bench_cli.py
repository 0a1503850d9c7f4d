"""`tao-fast bench`: one small CPU micro-benchmark through the command, its pytest-benchmark
JSON and table; a clear one-line error where there is no bench/ folder."""
import json

import pytest

from tao_fast import cli


def test_bench_runs_one_benchmark_and_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "bench_cpu_paths.py", "-k", "test_scorer_throughput and regex",
                   "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "benchmarks.json").read_text())
    (bench,) = data["benchmarks"]
    assert bench["name"] == "test_scorer_throughput[regex]"
    assert bench["stats"]["rounds"] == 5 and bench["stats"]["median"] > 0
    assert bench["extra_info"]["candidates"] == 1000
    table = (out / "benchmarks.md").read_text()
    assert "| benchmark | median ms | min ms | max ms | rounds | figures |" in table
    assert "test_scorer_throughput[regex]" in table and "candidates_per_s" in table
    assert "- machine: " in table and "commit " in table
    assert table in capsys.readouterr().out


def test_bench_without_a_bench_folder_is_one_clear_error(tmp_path, capsys):
    rc = cli.main(["bench", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no benchmarks at" in err and "git checkout" in err and "wheel" in err


def test_bench_help_explains_it(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--benchmark-only", "benchmarks.json", "benchmarks.md", "--gpu", "wheel"):
        assert needle in text, needle


def test_a_file_is_found_from_here_or_in_bench(tmp_path, monkeypatch):
    """`tao-fast bench bench/bench_pg_loss.py` (from the checkout) and `bench_pg_loss.py` name
    the same file; a name found nowhere is one line naming both places."""
    from tao_fast.profiling.bench import CHECKOUT, bench_dir, bench_file

    bench = bench_dir()
    want = str((bench / "bench_pg_loss.py").resolve())
    monkeypatch.chdir(CHECKOUT)
    assert bench_file("bench/bench_pg_loss.py", bench) == want
    monkeypatch.chdir(tmp_path)
    assert bench_file("bench_pg_loss.py", bench) == want
    with pytest.raises(FileNotFoundError, match="no benchmark file nope.py"):
        bench_file("nope.py", bench)
