"""What a rollout engine is: the Engine protocol, what generate() takes (SamplingParams) and
what it returns (Rollouts), and the prompt and stop-token rules every engine shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import torch

from tao_fast.config import ConfigError, RolloutConfig, check_sampling


@dataclass
class SamplingParams:
    """How one generate() call samples; the same checks as rollout.* (config.check_sampling)."""
    n: int = 1  # candidates per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's EOS
    seed: int | None = None
    # Global index of the first prompt of this call. When set (with seed), the torch engine
    # seeds each chunk of prompts from (seed, the chunk's first prompt's global index), so the
    # samples do not depend on how the prompts were split across calls or ranks.
    prompt_index: int | None = None

    def __post_init__(self):
        check_sampling(self.n, self.temperature, self.top_p, self.max_tokens, "SamplingParams.")

    @classmethod
    def from_config(cls, ro: RolloutConfig, *, seed: int) -> "SamplingParams":
        """A training step's sampling: rollout.n candidates per prompt at rollout.temperature,
        rollout.top_p, up to rollout.max_tokens tokens, seeded with `seed` (the caller's
        per-step seed). prompt_index=0: the prompts passed are the step's whole list, so the
        torch engine's samples do not depend on how ranks split it."""
        return cls(n=ro.n, temperature=ro.temperature, top_p=ro.top_p,
                   max_tokens=ro.max_tokens, seed=seed, prompt_index=0)


@dataclass
class Rollouts:
    """Candidates of P prompts, N each. Lists are indexed [prompt][candidate]."""
    prompt_ids: list[list[int]]  # [P][prompt_len]
    token_ids: list[list[list[int]]]  # [P][N][response_len]
    texts: list[list[str]]  # [P][N]
    logprobs: list[list[list[float]]]  # [P][N][response_len], after temperature/top-p
    finish_reasons: list[list[str]]  # [P][N]: "stop" or "length"
    stats: dict = field(default_factory=dict)  # tokens, seconds, tokens_per_s

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for group in self.token_ids for t in group)

    @classmethod
    def empty(cls) -> "Rollouts":
        """No prompts, nothing generated (a rank or engine with no share of a step)."""
        return cls([], [], [], [], [], stats={"tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0})


def check_fits(n_prompt: int, max_tokens: int, context: int, where: str,
               key: str = "max_tokens") -> None:
    """A prompt of n_prompt tokens and a response of up to max_tokens within the model's
    context, or a ConfigError naming the prompt (`where`), the sizes and what to change."""
    if n_prompt + max_tokens > context:
        raise ConfigError(f"{where}: {n_prompt:,} prompt tokens + {key}={max_tokens} exceed the "
                          f"model's context of {context:,} tokens: shorten or drop the prompt "
                          f"(tao-fast ingest --max-chars drops long ones), or lower {key}")


def check_records_fit(records, ids: Sequence[list[int]], max_tokens: int, context: int,
                      key: str) -> None:
    """check_fits for every prompt record (named by its file:line when it has one) and its
    token ids, before any of them is generated from."""
    for i, (rec, p) in enumerate(zip(records, ids, strict=True)):
        check_fits(len(p), max_tokens, context, rec.source or f"prompt {i}", key)


def check_prompts(prompts, max_tokens: int, context: int) -> None:
    """What every engine's generate() requires of its prompts (token id lists): at least one,
    none empty, each with its response within `context` tokens (checked before any cache is
    allocated for them)."""
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for i, p in enumerate(prompts):
        check_fits(len(p), max_tokens, context, f"prompt {i} of the batch")


def stop_token_ids(model_args, tokenizer) -> list[int]:
    """EOS ids of the model's config (an int or a list) and of the tokenizer, sorted."""
    eos = model_args.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def decode_response(tokenizer, token_ids: list[int], eos_ids) -> str:
    """A response's text: its tokens without the model's EOS ids, special tokens skipped."""
    return tokenizer.decode([t for t in token_ids if t not in eos_ids], skip_special_tokens=True)


class Engine(Protocol):
    """What the recipe, the evaluation and the judge need of a rollout engine. Engines subclass
    it, so the attributes below have these defaults and no caller probes for them."""

    name: str
    tokenizer: Any
    # the torch module the engine samples with (the learner's own, or a copy it keeps); None
    # when the engine has its own (vLLM)
    model: Any = None
    # data-parallel engines that step together (vLLM DP): every rank calls generate() the same
    # number of times, with no prompts when it has none
    lockstep: bool = False
    tensor_parallel: int = 1  # ranks that make one engine (vLLM TP); they get the same prompts
    # how the last load_weights() reached the engine: same-tensors (nothing to move) | copy |
    # alias | cast | reload (see each engine)
    sync_path: str = "same-tensors"
    max_context: int = 0  # prompt + response tokens a sequence may have

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams,
                 progress: bool = False) -> Rollouts:
        """P prompts (token id lists) -> Rollouts of P groups of sampling.n candidates."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Bring the learner's weights (its fused names) in, in place; tensors the engine
        already shares (same storage) cost nothing."""
        ...

    def sleep(self) -> None:
        """Free what generation holds between steps (vLLM: the KV cache)."""

    def wake(self) -> None:
        """Take back what sleep() freed."""

    def close(self) -> None:
        """Release the engine's resources (vLLM's engine core)."""
