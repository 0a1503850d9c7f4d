"""`tao-fast profile`: a few tune steps under torch.profiler, with a named range per phase.

Every step's phases carry ranges named `tao/<phase>` (generate, score, train, sync, sleep,
wake) and every public op in tao_fast.ops one named `tao_fast.<op>`: torch.profiler's
record_function, which shows in the Chrome trace and the op table, and on CUDA an NVTX range
too, so Nsight Systems shows the same names. Outside a profile they cost a few microseconds.

    OUT/trace.json     Chrome trace (chrome://tracing, ui.perfetto.dev)
    OUT/profile.md     seconds per phase, then the top ops by self time
    OUT/run/           the short run's own directory (metrics.jsonl, config.yaml)
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch

from tao_fast.config import TaoConfig
from tao_fast.fileio import atomic_write_text

PREFIX = "tao/"


@contextmanager
def phase(name: str):
    """A named range: record_function (torch.profiler), plus NVTX when CUDA is up."""
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


def profile_config(cfg: TaoConfig, steps: int, out_dir: Path) -> TaoConfig:
    """The run profiled: `steps` steps of one round, no held-out evaluation or pre-flight, no
    training states, its run directory under out_dir."""
    return dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, before=False, after=False, preflight=0),
        run=dataclasses.replace(cfg.run, steps=steps, rounds=1, keep_states=0, save_every=0,
                                output_dir=str(Path(out_dir) / "run")))


def phase_seconds(events) -> dict[str, float]:
    """{phase: seconds} summed over the steps, from torch.profiler's key_averages()."""
    return {e.key[len(PREFIX):]: e.cpu_time_total / 1e6 for e in events
            if e.key.startswith(PREFIX)}


def profile_tune(cfg: TaoConfig, out_dir, steps: int = 2, row_limit: int = 25) -> Path:
    """Set a run up (not profiled: model load, engine start), then profile its `steps` steps;
    write OUT/trace.json and OUT/profile.md. Returns the path of profile.md."""
    from torch.profiler import ProfilerActivity, profile

    from tao_fast.tuning import TaoRecipe

    out_dir = Path(out_dir)
    cfg = profile_config(cfg, steps, out_dir)
    recipe = TaoRecipe(cfg, Path(cfg.run.output_dir).resolve())
    recipe.setup()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        recipe.train()
    recipe.finish()
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    events = prof.key_averages()
    phases = phase_seconds(events)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines = [f"# tao-fast profile: {steps} step(s) of {cfg.model.path}", "",
             "| phase | seconds (all steps) |", "| --- | ---: |",
             *(f"| {k} | {v:.3f} |" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])),
             "", f"Top ops by {sort.replace('_', ' ')}:", "", "```",
             events.table(sort_by=sort, row_limit=row_limit), "```", "",
             f"Chrome trace: {out_dir / 'trace.json'}"]
    path = out_dir / "profile.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
