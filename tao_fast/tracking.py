"""Experiment trackers for `run.report_to`: TensorBoard, Weights & Biases, trackio.

Each gets what metrics.jsonl gets (every numeric value of a step's line, by name, at its
global_step), the held-out evaluations (eval/accuracy, eval/mean_score, ... at the global step
they were taken: 0 before training, the round's last step after it; eval_sampled/... for
eval.samples) and the run's config as hyperparameters (flattened: section.key). Everything is
written under the run directory and nothing leaves the machine unless the user says so:

    tensorboard  RUN_DIR/tensorboard/ (a resumed run adds an event file there; its steps from the
                 resume point on replace the ones logged before the interruption)
    wandb        RUN_DIR/wandb/, mode offline unless WANDB_MODE says otherwise; the run's id is
                 kept in RUN_DIR/wandb/run_id so that a resumed run logs to the same W&B run
                 (`wandb sync RUN_DIR/wandb/offline-run-*` uploads them)
    trackio      RUN_DIR/trackio/ (TRACKIO_DIR, unless the user set it), local only: no Space,
                 no upload; a resumed run continues the same trackio run

A backend is imported only when chosen; one not installed is a ConfigError at setup, before any
model loads (`check_installed`). Only rank 0 logs. A tracker that fails while the run goes (a
full disk, an exception in the library) never stops training: one warning on stderr, and that
tracker is dropped (metrics.jsonl still has everything).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Protocol

from tao_fast.config import ConfigError, TaoConfig

# what installs each backend's package, named as the backend (pyproject.toml's extras)
PACKAGES = {"tensorboard": "tensorboard>=2.14", "wandb": "wandb>=0.17", "trackio": "trackio>=0.2"}


class Tracker(Protocol):
    """One backend, opened on the run directory with the run's hyperparameters."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class Tensorboard:
    """Scalars in RUN_DIR/tensorboard/ through torch.utils.tensorboard (which needs the
    tensorboard package); the config as the hparams plugin's session. Flushed every step:
    a killed run loses nothing that metrics.jsonl has."""

    def __init__(self, run_dir: Path, hparams: dict, first_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # purge_step: TensorBoard drops what the interrupted run logged from first_step on
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step)
        for summary in hparams_summary(hparams, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A W&B run in RUN_DIR/wandb/, offline unless WANDB_MODE says otherwise. Charts are
    plotted against the logged global_step (wandb's own step only counts calls), so the steps
    a resumed run redoes are not refused as going back in time."""

    def __init__(self, run_dir: Path, hparams: dict, first_step: int | None):
        import wandb

        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                              project=os.environ.get("WANDB_PROJECT", "tao-fast"),
                              mode=os.environ.get("WANDB_MODE") or "offline")
        self.run.config.update(hparams, allow_val_change=True)  # a resume may change some
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "global_step": step})

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A local trackio project in RUN_DIR/trackio/ (trackio reads TRACKIO_DIR once, when first
    imported: a later run in the same process logs where the first one did), one run named after
    the run directory, resumed by that name."""

    def __init__(self, run_dir: Path, hparams: dict, first_step: int | None):
        if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
            os.environ["TRACKIO_DIR"] = str(run_dir / "trackio")
        import trackio

        self.trackio = trackio
        wanted = dict(project="tao-fast", name=run_dir.name, config=hparams, resume="allow",
                      space_id=None, embed=False)  # resume and embed: not in every version
        known = inspect.signature(trackio.init).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in known.values()):
            wanted = {k: v for k, v in wanted.items() if k in known}
        trackio.init(**wanted)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


BACKENDS: dict[str, type] = {"tensorboard": Tensorboard, "wandb": Wandb, "trackio": Trackio}


def warn(msg: str) -> None:
    print(f"[tao-fast] warning: {msg}", file=sys.stderr, flush=True)


class Trackers:
    """The chosen trackers, by name; each call goes to every one, and one that raises is warned
    about once and dropped."""

    def __init__(self, trackers: dict[str, Tracker] | None = None):
        self.trackers = dict(trackers or {})

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, metrics: dict, step: int) -> None:
        """A metrics.jsonl line: its numbers (ints and floats; not bools or strings), global_step
        aside."""
        if self.trackers:
            self._each("log", numbers(metrics), step)

    def log_eval(self, result, step: int) -> None:
        """A held-out evaluation (tao_fast.eval.EvalResult) taken at global step `step`."""
        if self.trackers:
            self._each("log", eval_metrics(result), step)

    def close(self) -> None:
        self._each("close")
        self.trackers.clear()

    def _each(self, method: str, *args) -> None:
        for name, t in list(self.trackers.items()):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # a tracker never stops training
                self.drop(name, f"{method} failed", e)

    def drop(self, name: str, what: str, e: Exception) -> None:
        t = self.trackers.pop(name, None)
        warn(f"run.report_to: {name} {what} ({type(e).__name__}: {e}); no more logging to "
             f"{name} in this run (metrics.jsonl has every step)")
        if t is not None and what != "close failed":
            try:
                t.close()
            except Exception:
                pass


def check_installed(cfg: TaoConfig) -> None:
    """Each chosen backend's package is installed (found, not imported: trackio reads where it
    writes when imported), else a ConfigError naming run.report_to and how to install it.
    Called at setup, before any model loads."""
    for name in cfg.run.trackers:
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # imported already, without a spec
            found = True
        if not found:
            raise ConfigError(f"run.report_to: {name} needs the {name} package, which is not "
                              f"installed: pip install '{PACKAGES[name]}' (or pip install "
                              f"'tao-fast[{name}]')")


def open_trackers(cfg: TaoConfig, run_dir: Path, first_step: int | None = None) -> Trackers:
    """run.report_to's trackers on rank 0 (none elsewhere), each given the flattened config.
    first_step: on a resumed run, the first global step it (re)logs. One that fails to open
    is warned about and left out: a tracker never stops the run."""
    from tao_fast.rl import distributed as dist_

    trackers = Trackers()
    if not cfg.run.trackers or not dist_.is_main():
        return trackers
    check_installed(cfg)
    hparams = flat_config(cfg.to_dict())
    for name in cfg.run.trackers:
        try:
            trackers.trackers[name] = BACKENDS[name](Path(run_dir), hparams, first_step)
        except Exception as e:
            trackers.drop(name, "failed to open", e)
    return trackers


def numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "global_step"}


def eval_metrics(result) -> dict[str, float]:
    """eval/... (greedy) or eval_sampled/... (eval.samples): accuracy, mean score, its 95% CI,
    tokens per response, and each task's accuracy and mean score (data.task_field)."""
    prefix = "eval" if result.mode == "greedy" else f"eval_{result.mode}"
    out = {f"{prefix}/accuracy": result.accuracy, f"{prefix}/mean_score": result.mean_score,
           f"{prefix}/ci_low": result.ci_low, f"{prefix}/ci_high": result.ci_high,
           f"{prefix}/mean_response_tokens": result.mean_response_tokens}
    for task, t in (result.by_task or {}).items():
        for k in ("accuracy", "mean_score"):
            if k in t:
                out[f"{prefix}/{task}/{k}"] = t[k]
    return numbers(out)


def flat_config(d: dict, prefix: str = "") -> dict:
    """{section: {key: value}} -> {"section.key": value}; nested dicts flattened the same way,
    values that are not a number, string or bool (None, lists) written as JSON."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out

