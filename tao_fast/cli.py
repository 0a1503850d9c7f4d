"""`tao-fast` command line: demo | tune | eval."""
from __future__ import annotations

import argparse
import json
import sys

from tao_fast.config import ConfigError, DataConfig

# The demo's settings for 2 CPU cores and a 15-minute budget (see README for the measured run).
DEMO = {
    "model.path": "embedded:smollm2-135m-instruct",
    "data.train": "builtin:arithmetic",
    "data.n_eval": 200,
    "rollout.n": 8,
    # 0.7 rather than 1.0: at 1.0 one sample is right ~3% of the time and 6-7 of 8 groups
    # carry no signal; at 0.7 about half do (measured in the first demo runs).
    "rollout.temperature": 0.7,
    "rollout.max_tokens": 32,
    "rollout.dtype": "bfloat16",  # sampler copy in bf16: ~2x faster CPU matmuls than fp32
    "eval.max_tokens": 32,
    "eval.scorer": "arithmetic",  # held-out accuracy is the verifier's, whatever trains
    "rl.prompts_per_step": 8,
    "rl.lr": 2e-5,
    "run.steps": 15,
    "run.output_dir": "runs/demo",
}

EPILOG = """examples:
  tao-fast demo                                  # tune the embedded model on arithmetic
  tao-fast demo --scorer random                  # the control: no gain expected
  tao-fast tune --config tune.yaml rl.lr=1e-5 rollout.n=16
  tao-fast eval --model runs/demo/checkpoint-round1 --prompts builtin:arithmetic
"""


def _overrides_help():
    return ("section.key=value overrides, e.g. rl.lr=1e-5 rollout.n=16 run.steps=50 "
            "(sections: model, data, rollout, scoring, rl, eval, run)")


def cmd_demo(args) -> int:
    from tao_fast.config import load_config
    from tao_fast.tuning import tune

    base = dict(DEMO)
    base["scoring.scorer"] = args.scorer
    if args.scorer != "arithmetic":
        base["run.output_dir"] = f"runs/demo-{args.scorer}"
    if args.out:
        base["run.output_dir"] = args.out
    if args.steps is not None:
        base["run.steps"] = args.steps
    cfg = load_config(None, args.overrides, base=base)
    res = tune(cfg)
    if res.eval_before and res.eval_after:
        gain = 100 * (res.eval_after.accuracy - res.eval_before.accuracy)
        print(f"held-out greedy accuracy: {100 * res.eval_before.accuracy:.1f}% -> "
              f"{100 * res.eval_after.accuracy:.1f}% ({gain:+.1f} points, n={res.eval_after.n}); "
              f"wall time {res.wall_seconds / 60:.1f} min; run dir {res.run_dir}")
    return 0


def cmd_tune(args) -> int:
    from tao_fast.tuning import tune

    res = tune(args.config, args.overrides)
    print(json.dumps({"run_dir": str(res.run_dir), "checkpoint": str(res.checkpoint),
                      "before": res.eval_before and res.eval_before.accuracy,
                      "after": res.eval_after and res.eval_after.accuracy,
                      "wall_seconds": round(res.wall_seconds, 1)}))
    return 0


def cmd_eval(args) -> int:
    from tao_fast.data import arithmetic_split, read_jsonl
    from tao_fast.eval import evaluate

    if args.prompts == "builtin:arithmetic":
        _, prompts = arithmetic_split(args.n_train_exclude, args.n, args.seed)
    else:
        prompts = read_jsonl(args.prompts)[:args.n]
    res = evaluate(args.model, prompts, args.scorer, max_tokens=args.max_tokens,
                   temperature=args.temperature, strategy=args.strategy, progress=True)
    print(res.summary())
    if args.out:
        res.save(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tao-fast", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Tune a language model from unlabeled prompts with TAO: sample many "
                    "candidates per prompt, score them, and turn the scores into RL updates.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="tune the embedded SmolLM2-135M on built-in arithmetic and "
                       "show held-out accuracy before/after",
                       description="Tune the embedded SmolLM2-135M-Instruct on two-digit "
                       "additions with the prompt-only verifier, and report held-out greedy "
                       "accuracy (200 prompts, 95%% CI) before and after. ~15 min on 2 cores.")
    d.add_argument("--scorer", default="arithmetic",
                   help="arithmetic (default) or random (the control run: no gain expected)")
    d.add_argument("--out", help="run directory (default runs/demo or runs/demo-random)")
    d.add_argument("--steps", type=int, help=f"RL steps (default {DEMO['run.steps']})")
    d.add_argument("overrides", nargs="*", help=_overrides_help())
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tune", help="tune a model from a YAML/TOML config",
                       description="Tune with TAO. Prompts come from data.train (a JSONL file "
                       "of {\"prompt\": ...} or {\"messages\": [...]} lines, or "
                       "builtin:arithmetic); the scorer from scoring.scorer (arithmetic, "
                       "random, or python:module:function).")
    t.add_argument("--config", required=True, help="YAML or TOML file with the run's sections")
    t.add_argument("overrides", nargs="*", help=_overrides_help())
    t.set_defaults(func=cmd_tune)

    e = sub.add_parser("eval", help="score a model's answers on held-out prompts",
                       description="Answer each prompt once (greedy by default), score the "
                       "answers and print accuracy with a 95%% confidence interval.")
    e.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="checkpoint directory (HF safetensors), .gguf file, or embedded:NAME")
    e.add_argument("--prompts", default="builtin:arithmetic",
                   help="JSONL prompt file, or builtin:arithmetic (the demo's held-out set)")
    e.add_argument("--scorer", default="arithmetic", help="scorer spec, as in scoring.scorer")
    e.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    e.add_argument("--max-tokens", type=int, default=48)
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    e.add_argument("--strategy", default="plain", choices=("plain", "cot", "structured"))
    e.add_argument("--seed", type=int, default=0, help="builtin task seed (as run.seed)")
    e.add_argument("--n-train-exclude", type=int, default=DataConfig.n_train,
                   help="builtin task: size of the training set whose questions are excluded")
    e.add_argument("--out", help="write the full result (every response) to this JSON file")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tao_fast.data.prompts import PromptFileError

    try:
        return args.func(args)
    except (ConfigError, PromptFileError, FileNotFoundError) as e:
        print(f"tao-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tao-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
