"""Rollout engines.

  protocol.py      the Engine protocol, SamplingParams, Rollouts, the prompt checks, stop tokens
  build.py         build_engine(rollout config, model, tokenizer): vLLM or the torch engine
  torch_engine.py  the in-house torch engine (CPU, tests, fallback)
  strategies.py    a step's candidates under rollout.strategy's prompts (several mixed in a
                   group), and the prompt the learner trains on (rollout.train_prompt)
  vllm/            the colocated vLLM engine: compat (version gate), weights (sync paths),
                   kv (KV-cache sleep/wake), engine (VllmEngine)
"""
from tao_fast.rollout.build import build_engine
from tao_fast.rollout.protocol import (
    Engine,
    Rollouts,
    SamplingParams,
    check_prompts,
    check_records_fit,
    stop_token_ids,
)

__all__ = ["Engine", "Rollouts", "SamplingParams", "check_prompts", "check_records_fit",
           "stop_token_ids", "build_engine"]
