"""Training state for --resume: model, optimizer, scheduler, RNG and data position.

    RUN_DIR/state/step-000012/  model.safetensors      the learner's trained parameters (master
                                                       dtype; a LoRA run's adapters alone)
                                optimizer.safetensors  AdamW moments and step counts
                                rng.safetensors        torch's CPU (and CUDA) generator states
                                state.json             scheduler, data order, python RNG, ...
    RUN_DIR/state/latest        the name of the newest complete state

A state is written under a temporary name and renamed into place, then `latest` is replaced
atomically; a kill at any moment leaves `latest` naming a complete state. Tensors go to
safetensors and everything else to JSON: nothing is pickled, so loading runs no code.
Where the run stood (round, step, data position, ...) is a `ResumeState`, written into
state.json by `to_json` and read back by `from_json`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tao_fast.config import ResumeError
from tao_fast.fileio import atomic_dir, atomic_write_text


@dataclass
class ResumeState:
    """Where a run stood when a training state was saved: state.json's fields beside the
    tensors. `step` is the last step done in `round`; `order` the data position (indices into
    the round's pool still to draw in this pass); `python_rng` the state of the Python RNG
    that shuffles them; `metrics_lines` how many lines of metrics.jsonl belong to the steps
    done; `checkpoint` the newest round checkpoint ("" before the first)."""
    round: int
    step: int
    learner_steps: int
    order: list[int]
    python_rng: tuple
    metrics_lines: int
    checkpoint: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> "ResumeState":
        """From a state.json (which also holds the optimizer's and scheduler's entries)."""
        version, internal, gauss = state["python_rng"]
        return cls(round=state["round"], step=state["step"],
                   learner_steps=state["learner_steps"], order=list(state["order"]),
                   python_rng=(version, tuple(internal), gauss),
                   metrics_lines=state["metrics_lines"], checkpoint=state.get("checkpoint", ""))

    def next_position(self, steps_per_round: int) -> tuple[int, int, list[int]]:
        """(round, step, order) to run next: the step after the saved one, or the first step
        of the next round when the saved step ended its round."""
        if self.step >= steps_per_round:
            return self.round + 1, 1, []
        return self.round, self.step + 1, list(self.order)


def _optimizer_split(opt: torch.optim.Optimizer, sd: dict | None = None) -> tuple[dict, dict]:
    """optimizer.state_dict() (or `sd`, one gathered from FSDP shards) -> (tensors for
    safetensors, the rest as JSON-able data)."""
    sd = opt.state_dict() if sd is None else sd
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a state holds: those that train (a LoRA model's adapters; every
    parameter of a full-weight one). A LoRA run's frozen base is model.path's, read again."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def estimate_bytes(model: torch.nn.Module) -> int:
    """Disk a state needs: the trained weights plus two AdamW moments, plus slack."""
    n = sum(p.numel() * p.element_size() for p in trainable(model).values())
    return 3 * n + (16 << 20)


def save_state(run_dir: Path, step: int, model, opt, sched, extra: dict, keep: int = 1,
               model_state: dict | None = None, opt_state: dict | None = None) -> Path:
    """model_state / opt_state: whole states gathered from FSDP shards (Learner.full_state);
    by default the model's parameters and the optimizer's state_dict()."""
    root = Path(run_dir) / "state"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    with atomic_dir(root / name) as tmp:
        weights = model_state if model_state is not None else trainable(model)
        save_file({k: p.detach().contiguous() for k, p in weights.items()},
                  str(tmp / "model.safetensors"))
        tensors, meta = _optimizer_split(opt, opt_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizer": meta,
                 "scheduler": sched.state_dict() if sched is not None else None, **extra}
        (tmp / "state.json").write_text(json.dumps(state))
    atomic_write_text(root / "latest", name)
    done = sorted(p for p in root.glob("step-" + "[0-9]" * 6) if p.is_dir())
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob("*.tmp-*"), *root.glob("*.old")]:  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return root / name


def latest_state(run_dir: Path) -> Path | None:
    ptr = Path(run_dir) / "state" / "latest"
    if not ptr.exists():
        return None
    path = ptr.parent / ptr.read_text().strip()
    if not (path / "state.json").exists():
        raise ResumeError(f"{ptr} names {path.name}, which is incomplete or missing")
    return path


def load_state(path: Path, model, opt, sched) -> dict:
    """Restore weights, optimizer, scheduler and torch RNG in place; returns state.json."""
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    params = trainable(model)
    if set(weights) != set(params):
        raise ResumeError(f"{path}: saved parameters do not match the model "
                          f"({len(weights)} saved, {len(params)} in the model)")
    opt_state = _optimizer_join(load_file(str(path / "optimizer.safetensors")),
                                state["optimizer"])
    from tao_fast.rl.fsdp import is_sharded, load_full_state

    if is_sharded(model) and model.lora_config is None:  # FSDP2 shards (LoRA:
        # the adapters are whole on every rank, the sharded base is not in the state)
        load_full_state(model, opt, weights, opt_state)
    else:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k])
        opt.load_state_dict(opt_state)
    if sched is not None and state.get("scheduler") is not None:
        sched.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return state
