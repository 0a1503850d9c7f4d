"""bench/harness.py: the CPU timer, peak memory after the previous run is freed, rows written
the moment they are measured, error isolation, run metadata."""
import json
import time

import pytest
import torch
from bench_modules import load

harness = load("harness")


def test_cpu_timer_is_the_median_and_fills_its_budget():
    calls = []
    delays = iter([0.05] + [0.002] * 100)  # the warm-up is slow (a compile), the rest fast

    def fn():
        calls.append(1)
        time.sleep(next(delays))
    ms = harness.cpu_median_ms(fn, budget_ms=40, min_reps=3, max_reps=10, warmup=1)
    assert 1.5 <= ms < 40, ms  # the warm-up's 50 ms is not in it
    assert 1 + 3 <= len(calls) <= 1 + 10
    calls.clear()
    slow = harness.cpu_median_ms(lambda: (calls.append(1), time.sleep(0.02)), budget_ms=0,
                                 min_reps=2, max_reps=2, warmup=0)
    assert len(calls) == 2 and slow >= 19


class FakeAllocator:
    """Stands in for the CUDA caching allocator's counters (no GPU here): bytes allocated now
    and the peak since the last reset."""

    def __init__(self):
        self.now = self.peak = 0

    def alloc(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, n):
        self.now -= n

    def sync(self):
        pass

    def reset_peak(self):
        self.peak = self.now

    def allocated(self):
        return self.now

    def max_allocated(self):
        return self.peak


MiB = 2 ** 20


def test_peak_memory_is_taken_after_the_previous_runs_tensors_are_freed():
    """A fwd+bwd run: 300 MiB of activations at its peak, then 200 MiB of gradients that stay
    allocated. The next run drops the old gradients first; measured with free_before, its peak
    is charged in full (500 MiB); with the baseline read while the old gradients were still
    there (the old gpu_loss_kernels.py), it came out 200 MiB (dh + dW) short."""
    mem = FakeAllocator()
    grads = []

    def free_grads():
        while grads:
            mem.free(grads.pop())

    def fwd_bwd():
        free_grads()  # as the benchmark's fwd_bwd does: x.grad = None first
        mem.alloc(300 * MiB)  # activations
        mem.alloc(200 * MiB)  # the gradients
        grads.append(200 * MiB)
        mem.free(300 * MiB)

    fwd_bwd()  # the previous run: its gradients are still allocated
    assert harness.peak_extra_mib(fwd_bwd, "cpu", free_before=free_grads, stats=mem) == 500
    assert harness.peak_extra_mib(fwd_bwd, "cpu", stats=mem) == 300  # the under-report
    assert harness.peak_extra_mib(fwd_bwd, "cpu") is None  # no CUDA: nothing to read


def test_rows_reach_the_file_the_moment_they_are_measured(tmp_path, capsys):
    res = harness.Results(tmp_path / "r.jsonl", step="s")
    table = res.table("t", "title", [("a", "A", ".1f"), ("b", "B", "")])
    table.add({"a": 1.25, "b": "x"})
    # read back before anything is closed: a run killed now keeps the row
    recs = harness.read_records(tmp_path / "r.jsonl")
    assert [r["kind"] for r in recs] == ["table", "row"]
    assert recs[1] == {"kind": "row", "step": "s", "table": "t", "a": 1.25, "b": "x"}
    assert "| 1.2 | x |  |" in capsys.readouterr().out
    table.add({"a": None, "error": "OOM"})
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"kind": "row", "step": "s", "tab')  # a line cut short by a kill
    recs = harness.read_records(tmp_path / "r.jsonl")
    assert len(recs) == 3
    md = "\n".join(harness.render_tables(recs))
    assert "**title**" in md and "| A | B | note |" in md and "| - | - | OOM |" in md


@pytest.mark.parametrize("exc,text", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "OOM"),
    (ImportError("no module", name="liger_kernel"), "not importable: liger_kernel"),
    (RuntimeError("triton: illegal memory access\nmore"), "RuntimeError: triton: illegal memory "
                                                          "access"),
])
def test_isolate_records_the_error_and_goes_on(exc, text):
    row = {"provider": "p"}
    with harness.isolate(row):
        raise exc
    assert row["error"] == text
    with pytest.raises(KeyboardInterrupt):
        with harness.isolate({}):
            raise KeyboardInterrupt


def test_run_meta_names_device_versions_date_commit_command(monkeypatch, tmp_path):
    meta = harness.run_meta("cpu", ["bench/x.py", "--dry-run"])
    for key in ("device", "cpu", "torch", "triton", "python", "date", "commit"):
        assert meta[key], key
    assert "cuda_runtime" in meta  # None on a CPU build of torch
    assert meta["device"] == "cpu" and meta["command"] == "python bench/x.py --dry-run"
    json.dumps(meta)
    monkeypatch.setattr(harness, "ROOT", tmp_path)  # a copy without .git, as on a GPU machine
    monkeypatch.setenv("TAO_FAST_COMMIT", "abc1234")
    assert harness.git_commit() == "abc1234 (from TAO_FAST_COMMIT)"
    monkeypatch.delenv("TAO_FAST_COMMIT")
    assert harness.git_commit().startswith("unknown")


def test_smoke_judge_fails_a_wrong_or_unwritten_output():
    """The smoke check's verdict: within 2x plain torch's error passes; an output that is off,
    or that has an element the kernel never wrote (NaN poison), fails."""
    smoke = load("gpu_smoke")
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=g, dtype=torch.float64)
    plain = ref + 1e-3 * torch.randn(1000, generator=g, dtype=torch.float64)
    good = ref + 1.5e-3 * torch.randn(1000, generator=g, dtype=torch.float64)
    _, worst = smoke.judge("op", torch.bfloat16, "cpu", ["x"], [good], [ref], [plain])
    assert worst <= 1.0
    off = good.clone()
    off[::10] += 0.1
    _, worst = smoke.judge("op", torch.bfloat16, "cpu", ["x"], [off], [ref], [plain])
    assert worst > 1.0
    unwritten = good.clone()
    unwritten[7] = float("nan")
    _, worst = smoke.judge("op", torch.bfloat16, "cpu", ["x", "y"], [unwritten, good],
                           [ref, ref], [plain, plain])
    assert not worst <= 1.0
