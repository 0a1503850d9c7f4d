"""Every knob of a run, as dataclasses. Loaded from a YAML or TOML file plus `section.key=value`
overrides; an unknown key or a bad value is an error that names the key."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad key or value; the message names it (and the file, when there is one)."""


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed; the message says why."""


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value, choices, key):
    _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


WEIGHT_DTYPES = ("float32", "bfloat16")  # model.dtype and rollout.dtype
# rollout.strategy's names: the keys of tao_fast.data.prompts.STRATEGY_SUFFIX
STRATEGIES = ("plain", "cot", "structured", "fewshot")


def check_sampling(n: int, temperature: float, top_p: float, max_tokens: int,
                   where: str) -> None:
    """The sampling checks, written once: RolloutConfig (where="rollout.") and
    tao_fast.rollout.SamplingParams (where="SamplingParams.") both call it. A ConfigError
    (a ValueError) naming where + the field."""
    _check(n >= 1, f"{where}n", f"must be >= 1, got {n}")
    _check(temperature >= 0, f"{where}temperature", f"must be >= 0, got {temperature}")
    _check(0 < top_p <= 1, f"{where}top_p", f"must be in (0, 1], got {top_p}")
    _check(max_tokens >= 1, f"{where}max_tokens", f"must be >= 1, got {max_tokens}")


# PEFT's names of the decoder's linear layers (model.lora.target_modules); the fused qkv_proj and
# gate_up_proj get one A/B pair per part (tao_fast/models/lora.py)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """model.lora: low-rank adapters on the frozen base (tao_fast/models/lora.py). rank 0 (the
    default) tunes every weight instead."""
    rank: int = 0  # r of each adapter; 0 = full-weight tuning
    alpha: float = 32.0  # the update is (alpha / rank) * B @ A
    dropout: float = 0.0  # on the adapters' input, while training
    # PEFT module names, as a list or joined by commas; all-linear = all seven
    target_modules: str | list = "all-linear"
    # the frozen base's dtype: auto = bfloat16 on a GPU or a CPU with native bf16 matmuls, else
    # model.dtype (bf16 GEMMs ran 4-5x slower than fp32 on a CPU without them); the adapters
    # and their AdamW state are fp32
    base_dtype: str = "auto"

    def __post_init__(self):
        _check(self.rank >= 0, "model.lora.rank", f"must be >= 0 (0 = full-weight), got "
               f"{self.rank}")
        _check(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got "
               f"{self.dropout}")
        _one_of(self.base_dtype, ("auto", *WEIGHT_DTYPES), "model.lora.base_dtype")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not bad and bool(self.targets), "model.lora.target_modules",
               f"must be all-linear or some of {list(LORA_TARGETS)}, got {self.target_modules!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def targets(self) -> tuple[str, ...]:
        """target_modules as PEFT names, each once, in LORA_TARGETS' order."""
        names = self.target_modules
        if isinstance(names, str):
            names = [n.strip() for n in names.strip("[]").split(",") if n.strip()]
        if list(names) == ["all-linear"]:
            return LORA_TARGETS
        names = [str(n) for n in names]
        return tuple([t for t in LORA_TARGETS if t in names]
                     + [n for n in dict.fromkeys(names) if n not in LORA_TARGETS])


@dataclass
class ModelConfig:
    """The model section; tao_fast.models.load_model(ModelConfig) reads path, dtype and
    gradient_checkpointing; the learner reads ops_backend."""
    path: str = "embedded:smollm2-135m-instruct"  # embedded[:name], HF safetensors dir, or .gguf
    dtype: str = "float32"  # learner's master weights
    ops_backend: str = "auto"  # tao_fast.ops backend for the learner: auto | triton | torch
    gradient_checkpointing: bool = False
    # the learner's forward and backward under torch.autocast (fp32 master weights and AdamW
    # state stay): auto = bfloat16 on a CPU with native bf16 matmuls (AMX-BF16 / AVX512-BF16),
    # else none | bfloat16 | none (tao_fast/dtypes.py learner_autocast)
    autocast: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train adapters only

    def __post_init__(self):
        _one_of(self.dtype, WEIGHT_DTYPES, "model.dtype")
        _one_of(self.ops_backend, ("auto", "triton", "torch"), "model.ops_backend")
        _one_of(self.autocast, ("auto", "none", "bfloat16"), "model.autocast")


BUILTIN_TASKS = ("arithmetic", "json", "multiply")  # builtin:NAME (tao_fast/data/tasks.py)
SOURCE_KEYS = ("source", "weight", "task", "n_train", "n_eval")


@dataclass(frozen=True)
class Source:
    """One source of training prompts: an entry of data.train (tao_fast/data/sources.py)."""
    source: str  # builtin:NAME, a JSONL prompt file, or a directory of them
    weight: float = 1.0  # share of each step's prompts drawn from this source (of the total)
    # data.task_field for its records that name none ("" = none; a builtin task in a mix of
    # several sources: its own name)
    task: str = ""
    n_train: int | None = None  # builtin task: its training prompts; None = data.n_train
    n_eval: int | None = None  # builtin task: its held-out prompts; None = data.n_eval

    @property
    def builtin(self) -> str:
        """The builtin task's name ("" for a file or directory)."""
        return self.source[len("builtin:"):] if self.source.startswith("builtin:") else ""


def _source(entry, key: str) -> Source:
    """One entry of data.train's list: "PATH" or {source: PATH, weight: 2, task: sql, ...}."""
    if isinstance(entry, str):
        entry = {"source": entry}
    _check(isinstance(entry, dict), key, f"expected a source (a path, or a mapping with "
           f"{list(SOURCE_KEYS)}), got {entry!r}")
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    _check(not unknown, f"{key}.{unknown[0] if unknown else ''}",
           f"unknown key (known: {list(SOURCE_KEYS)})")
    _check(isinstance(entry.get("source"), str) and bool(entry.get("source")), f"{key}.source",
           f"must be a path or builtin:NAME, got {entry.get('source')!r}")
    kw = {k: _coerce(v, typing.get_type_hints(Source)[k], f"{key}.{k}") for k, v in entry.items()}
    src = Source(**kw)
    _check(src.weight > 0, f"{key}.weight", f"must be > 0, got {src.weight}")
    for k in ("n_train", "n_eval"):
        v = getattr(src, k)
        _check(v is None or v >= (k == "n_train"), f"{key}.{k}", f"must be >= "
               f"{int(k == 'n_train')}, got {v}")
        _check(v is None or src.builtin, f"{key}.{k}", "sets a builtin task's size; "
               f"{src.source!r} is a prompt file or directory")
    return src


@dataclass
class DataConfig:
    # builtin:NAME (arithmetic | json | multiply), a JSONL prompt file, or a directory of them
    # (each round adds the files that appeared since the last one; heldout*.jsonl files are
    # skipped); or a list of such sources with weights, a mix: each step's prompts are drawn
    # to the weights, e.g. [{source: builtin:arithmetic, weight: 2}, {source: sql.jsonl,
    # task: sql}] (keys: source, weight, task, n_train, n_eval)
    train: str | list = "builtin:arithmetic"
    eval: str = ""  # JSONL of held-out prompts; "" = the builtin task's held-out split, or none
    n_train: int = 1024  # builtin task: training prompts
    n_eval: int = 200  # builtin task: held-out prompts (seeds disjoint from training)
    ops: str = "+"  # builtin task: operators, e.g. "+-"
    digits: int = 2
    words: float = 0.0  # builtin task: fraction of questions written in words
    system_prompt: str = ""  # "" = the chat template's default
    replay_frac: float = 0.25  # share of a round's prompts replayed from earlier rounds
    # the record key naming a prompt's task (e.g. "task": "sql" beside "prompt"): the held-out
    # evaluation and the summary break their figures down by it where records carry it
    task_field: str = "task"
    # `tune --follow LOGDIR`: a request-log directory (tao-fast serve's) to follow; each round
    # ingests the completed logs that arrived since into RUN_DIR/follow/round-NNN/ and data.train
    # is that directory (tao_fast/data/follow.py); "" = off
    follow: str = ""
    min_new_prompts: int = 64  # follow: new training prompts a round waits for
    follow_poll_s: float = 10.0  # follow: seconds between looks at the log directory
    follow_max_wait_s: float = 0.0  # follow: the run ends after this long waiting (0 = never)
    follow_rounds: int = 0  # follow: rounds to run, in place of run.rounds (0 = until stopped)

    def __post_init__(self):
        _check(self.min_new_prompts >= 1, "data.min_new_prompts",
               f"must be >= 1, got {self.min_new_prompts}")
        _check(self.follow_poll_s > 0, "data.follow_poll_s",
               f"must be > 0, got {self.follow_poll_s}")
        _check(self.follow_max_wait_s >= 0, "data.follow_max_wait_s",
               f"must be >= 0 (0 = wait forever), got {self.follow_max_wait_s}")
        _check(self.follow_rounds >= 0, "data.follow_rounds",
               f"must be >= 0 (0 = until stopped), got {self.follow_rounds}")
        _check(self.n_train >= 1, "data.n_train", f"must be >= 1, got {self.n_train}")
        _check(self.n_eval >= 0, "data.n_eval", f"must be >= 0, got {self.n_eval}")
        _check(0.0 <= self.words <= 1.0, "data.words", f"must be in [0, 1], got {self.words}")
        _check(0.0 <= self.replay_frac < 1.0, "data.replay_frac",
               f"must be in [0, 1), got {self.replay_frac}")
        _check(1 <= self.digits <= 3, "data.digits", f"must be 1..3, got {self.digits}")
        _check(bool(self.ops) and not set(self.ops) - set("+-"), "data.ops",
               f"must be made of '+' and '-', got {self.ops!r}")
        srcs = self.sources
        for i, src in enumerate(srcs):
            where = "data.train" if isinstance(self.train, str) else f"data.train[{i}]"
            _check(not src.builtin or src.builtin in BUILTIN_TASKS, where,
                   f"unknown builtin task {src.source!r} (builtin: {', '.join(BUILTIN_TASKS)})")
        names = [s.source for s in srcs]
        dup = next((n for n in names if names.count(n) > 1), None)
        _check(dup is None, "data.train", f"names {dup!r} twice")

    @property
    def sources(self) -> tuple[Source, ...]:
        """data.train as sources: one of weight 1 for a string, each entry of a list."""
        if isinstance(self.train, str):
            _check(bool(self.train), "data.train", "must not be empty")
            return (Source(self.train),)
        _check(bool(self.train), "data.train", "an empty list: give one source at least")
        return tuple(_source(e, f"data.train[{i}]") for i, e in enumerate(self.train))

    @property
    def mixed(self) -> bool:
        """Several sources (a mix): builtin tasks name their task, each step draws to weights."""
        return not isinstance(self.train, str) and len(self.train) > 1


@dataclass
class RolloutConfig:
    """The rollout section, checked whole here (the engines take it as it is):
    tao_fast.rollout.build_engine, VllmEngine and SamplingParams.from_config read it."""
    engine: str = "auto"  # auto (vllm when importable, else torch) | torch | vllm
    n: int = 8  # candidates per prompt: the tuning-compute knob
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    # how the prompt asks for the answer: plain | cot | structured, or several joined with '+'
    # (e.g. plain+cot): candidate j of a group is generated under strategy j % k
    strategy: str = "plain"
    # the prompt the learner trains on and the held-out evaluation answers: strategy (the
    # strategy's prompt) | plain (the user's own prompt: the tuned model needs no suffix)
    train_prompt: str = "strategy"
    # the fewshot strategy's examples: JSONL, {"prompt": ..., "response": ...} a line (1-16),
    # put before every prompt it generates for; needed by it and by nothing else
    fewshot_file: str = ""
    # sampler weights: auto = bfloat16 on a CPU with native bf16 matmuls (AMX / AVX512-BF16),
    # else model.dtype (the learner's tensors, shared: no copy) | float32 | bfloat16
    dtype: str = "auto"
    max_batch_rows: int = 256  # torch engine: sequences decoded together
    # vLLM engine (rollout.engine=vllm, or auto with vLLM installed):
    gpu_memory_utilization: float = 0.5  # share of GPU memory for vLLM's weights + KV cache
    kv_cache_gb: float = 0.0  # KV cache size; 0 = from the share on a GPU, 1 GiB on the CPU backend
    max_model_len: int = 0  # prompt + response tokens per sequence; 0 = the model's maximum
    enforce_eager: bool | str = "auto"  # true | false (compiled, CUDA graphs) | auto (eager on CPU)
    weight_sync: str = "auto"  # shared (vLLM's tensors = the learner's) | reload (vLLM's own
    # in-place reload; keeps its packed CPU GEMMs) | auto (shared): tao_fast/rollout/vllm/weights.py
    # model.lora with vLLM: how the adapter reaches it after each update: memory (vLLM's LoRA
    # model built from the tensors) | disk (a PEFT directory vLLM reloads) | auto (memory, disk
    # where that fails): tao_fast/rollout/vllm/adapter.py
    lora_sync: str = "auto"
    # under torchrun: ranks per vLLM engine (its tensor-parallel degree; must divide the world);
    # 1 = every rank runs its own whole-model vLLM on its share of the prompts
    tensor_parallel: int = 1

    def __post_init__(self):
        _one_of(self.engine, ("auto", "torch", "vllm"), "rollout.engine")
        _check(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.kv_cache_gb >= 0, "rollout.kv_cache_gb", f"must be >= 0, got {self.kv_cache_gb}")
        _check(self.max_model_len >= 0, "rollout.max_model_len",
               f"must be >= 0 (0 = the model's maximum), got {self.max_model_len}")
        _one_of(self.enforce_eager, (True, False, "auto"), "rollout.enforce_eager")
        _one_of(self.weight_sync, ("auto", "shared", "reload"), "rollout.weight_sync")
        _one_of(self.lora_sync, ("auto", "memory", "disk"), "rollout.lora_sync")
        _check(self.tensor_parallel >= 1, "rollout.tensor_parallel", "must be >= 1")
        _check(self.tensor_parallel == 1 or self.weight_sync != "shared",
               "rollout.tensor_parallel", "> 1 shards vLLM's weights, which the learner's whole "
               "tensors cannot share: use rollout.weight_sync=reload (or auto)")
        check_sampling(self.n, self.temperature, self.top_p, self.max_tokens, "rollout.")
        self._check_strategy()
        _one_of(self.dtype, ("auto", *WEIGHT_DTYPES), "rollout.dtype")
        _check(self.max_batch_rows >= 1, "rollout.max_batch_rows", "must be >= 1")

    def _check_strategy(self) -> None:
        _one_of(self.train_prompt, ("strategy", "plain"), "rollout.train_prompt")
        names = self.strategies
        for name in names:
            _one_of(name, STRATEGIES, "rollout.strategy")
        _check(len(set(names)) == len(names), "rollout.strategy",
               f"names a strategy twice: {self.strategy!r}")
        k = len(names)
        _check(k == 1 or self.train_prompt == "plain", "rollout.strategy",
               f"{self.strategy!r} mixes {k} prompts in a group, which then train on one "
               f"prompt: needs rollout.train_prompt=plain")
        _check(self.n >= k, "rollout.n", f"must be >= {k}, the strategies in "
               f"rollout.strategy={self.strategy!r} (one candidate each at least), got {self.n}")
        _check(("fewshot" in names) == bool(self.fewshot_file), "rollout.fewshot_file",
               "is what the fewshot strategy needs, and only it: set both or neither "
               f"(rollout.strategy={self.strategy!r}, fewshot_file={self.fewshot_file!r})")

    @property
    def strategies(self) -> tuple[str, ...]:
        """The strategies candidates are generated under: candidate j uses strategies[j % k]."""
        return tuple(self.strategy.split("+"))

    @property
    def prompt_strategy(self) -> str:
        """The strategy of the prompt the learner trains on and the held-out evaluation (and
        so the tuned model's user) answers: plain with train_prompt=plain, else the strategy."""
        return "plain" if self.train_prompt == "plain" else self.strategy


@dataclass
class ScoringConfig:
    # a scorer name (arithmetic | random | consensus | json | code | sql | ...), a user function
    # "python:module:function", or a mapping {type: ..., options} such as a weighted/gated mix;
    # see tao_fast/scoring/__init__.py and the README's scorer table
    scorer: str | dict = "arithmetic"
    failure_value: float = 0.0  # reward of a candidate whose scoring failed
    timeout_s: float = 60.0  # sandboxed scorers (user functions, code, SQL): wall-clock limit
    memory_mb: int = 2048  # sandboxed scorers: address-space limit

    def __post_init__(self):
        _check(bool(self.scorer), "scoring.scorer", "must not be empty")
        _check(self.timeout_s > 0, "scoring.timeout_s", "must be > 0")
        _check(self.memory_mb >= 64, "scoring.memory_mb", "must be >= 64")


@dataclass
class RLConfig:
    """The rl section. The algorithm's own settings (tao_fast/rl/algorithms.py: its advantage,
    loss, aggregation, clip range, dynamic sampling and overlong handling) apply wherever a key
    here is left at None / "auto"; a key set here wins."""
    # grpo | dr-grpo | dapo | gspo | rloo | bon-sft (best-of-N rejection-sampling fine-tuning)
    algorithm: str = "grpo"
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_coef: float = 0.0  # > 0 keeps a frozen reference model
    kl_estimator: str = "k3"
    # passes over one rollout batch, and optimizer steps per pass (the batch split in that many
    # minibatches, reshuffled every pass); with more than one update the learner's log-probs
    # before the first are the old log-probs the ratio and the clip compare against
    epochs: int = 1
    minibatches: int = 1
    clip_low: float | None = None  # None = the algorithm's (0.2; gspo 3e-4)
    clip_high: float | None = None  # None = the algorithm's (0.2; dapo 0.28; gspo 4e-4)
    dual_clip: float = 0.0  # > 1: negative-advantage tokens lose at most dual_clip x |A|; 0 = off
    # token-mean | seq-mean-token-mean | token-sum-norm (sum / (rollout.max_tokens x sequences))
    loss_agg: str = "auto"
    tis_cap: float = 2.0  # truncated importance weight cap (sampler vs learner log-probs)
    prompts_per_step: int = 8
    # extra generation rounds a step may take to fill rl.prompts_per_step groups with signal
    # (unequal rewards): DAPO's dynamic sampling. None = the algorithm's (dapo 3, else 0)
    dynamic_sampling: int | None = None
    # candidates cut at rollout.max_tokens: none | filter (left out of the loss) | penalty
    # (DAPO's soft overlong punishment: reward - up to 1 over the last overlong_cache tokens)
    overlong: str = "auto"  # auto = the algorithm's (dapo: penalty; else none)
    overlong_cache: int = 0  # 0 = rollout.max_tokens // 5
    # shorter answers among equally scored ones: subtracts length_penalty x (tokens - the
    # group's mean) / rollout.max_tokens from each advantage (at most length_penalty); in
    # bon-sft the shortest of the top-scored candidates is chosen. 0 = off
    length_penalty: float = 0.0
    sft_top_k: int = 1  # bon-sft: candidates trained on per group (the top-scored)
    micro_batch_tokens: int = 4096  # token budget of one forward/backward
    std_normalize: bool = True  # GRPO-style advantages divide by the group's std
    warmup_steps: int = 0  # linear learning-rate warm-up (in optimizer steps), then constant
    # under torchrun: ddp (a full replica per rank, gradients summed) | fsdp (FSDP2
    # fully_shard: parameters, gradients and AdamW state sharded) | auto (ddp where a replica
    # fits the GPU by the accounting in rl/memory.py, else fsdp; ddp on the CPU)
    parallel: str = "auto"

    def __post_init__(self):
        from tao_fast.rl.algorithms import ALGORITHMS, LOSS_AGGS, resolve

        _one_of(self.algorithm, tuple(ALGORITHMS), "rl.algorithm")
        loss = ALGORITHMS[self.algorithm].loss
        _check(self.lr > 0, "rl.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "rl.weight_decay", "must be >= 0")
        _check(self.max_grad_norm > 0, "rl.max_grad_norm", "must be > 0")
        _check(self.kl_coef >= 0, "rl.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _check(not (self.kl_coef and loss != "ppo"), "rl.kl_coef",
               f"{self.algorithm}'s loss has no KL term here (the token-level PPO loss has): "
               f"set rl.kl_coef=0")
        _one_of(self.kl_estimator, ("k1", "k3"), "rl.kl_estimator")
        _check(self.epochs >= 1, "rl.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.minibatches >= 1, "rl.minibatches", f"must be >= 1, got {self.minibatches}")
        _check(self.clip_low is None or 0 <= self.clip_low < 1, "rl.clip_low",
               f"must be in [0, 1), got {self.clip_low}")
        _check(self.clip_high is None or self.clip_high >= 0, "rl.clip_high",
               f"must be >= 0, got {self.clip_high}")
        _check(self.dual_clip == 0 or self.dual_clip > 1, "rl.dual_clip",
               f"must be 0 (off) or > 1, got {self.dual_clip}")
        _check(not (self.dual_clip and loss != "ppo"), "rl.dual_clip",
               f"applies to the token-level PPO loss, not {self.algorithm}'s")
        _check(self.loss_agg == "auto" or self.loss_agg in LOSS_AGGS[loss], "rl.loss_agg",
               f"must be auto or one of {list(LOSS_AGGS[loss])} for {self.algorithm}, "
               f"got {self.loss_agg!r}")
        _check(self.tis_cap >= 1, "rl.tis_cap", f"must be >= 1, got {self.tis_cap}")
        _check(self.prompts_per_step >= 1, "rl.prompts_per_step", "must be >= 1")
        _check(self.dynamic_sampling is None or self.dynamic_sampling >= 0,
               "rl.dynamic_sampling", f"must be >= 0, got {self.dynamic_sampling}")
        _one_of(self.overlong, ("auto", "none", "filter", "penalty"), "rl.overlong")
        _check(self.overlong_cache >= 0, "rl.overlong_cache", "must be >= 0")
        _check(0 <= self.length_penalty <= 1, "rl.length_penalty",
               f"must be in [0, 1], got {self.length_penalty}")
        _check(self.sft_top_k >= 1, "rl.sft_top_k", f"must be >= 1, got {self.sft_top_k}")
        _check(self.sft_top_k == 1 or loss == "sft", "rl.sft_top_k",
               f"chooses bon-sft's candidates; {self.algorithm} trains on every one")
        _check(not self.overlong_cache or resolve(self, 1).overlong == "penalty",
               "rl.overlong_cache",
               "sets the overlong penalty's window: it needs rl.overlong=penalty")
        _check(self.micro_batch_tokens >= 16, "rl.micro_batch_tokens", "must be >= 16")
        _check(self.warmup_steps >= 0, "rl.warmup_steps", "must be >= 0")
        _one_of(self.parallel, ("auto", "ddp", "fsdp"), "rl.parallel")


@dataclass
class EvalConfig:
    before: bool = True  # held-out greedy accuracy before tuning
    after: bool = True
    max_tokens: int = 64
    # held-out scorer; "" = scoring.scorer. The random control trains on coin flips but must
    # be judged by the task's verifier: its demo sets eval.scorer=arithmetic.
    scorer: str | dict = ""
    samples: int = 1  # sampled answers per prompt at rollout.temperature (pass@1); 0 = none
    # where eval.scorer is set and differs from scoring.scorer (tao_fast/scoring/check.py):
    # preflight: held-out prompts on which the training scorer is measured against eval.scorer
    # after eval_before (RUN_DIR/preflight.json, a warning, never a refusal); 0 = off.
    # probe: auto = each step's candidates are also scored by eval.scorer, when it checks the
    # training prompts (metrics' probe_accuracy; no extra generation); off (YAML's false) = never
    preflight: int = 32
    probe: bool | str = "auto"

    def __post_init__(self):
        _check(self.max_tokens >= 1, "eval.max_tokens", "must be >= 1")
        _check(self.samples >= 0, "eval.samples", "must be >= 0")
        _check(self.preflight >= 0, "eval.preflight", f"must be >= 0, got {self.preflight}")
        if self.probe is False:  # a bare `off` is YAML's false
            self.probe = "off"
        _one_of(self.probe, ("auto", "off"), "eval.probe")


@dataclass
class RunConfig:
    steps: int = 20  # RL steps per round
    rounds: int = 1
    output_dir: str = "runs/tao"
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    save_every: int = 10  # steps between resumable training states (0 = at round ends only)
    # training states kept on disk, each ~3x the learner's weights (weights + AdamW moments;
    # 1.6 GB for the 135M model); 0 = write none: a killed run cannot be resumed
    keep_states: int = 1
    # round checkpoints: auto = the learner's dtype (model.dtype); bfloat16 halves an fp32
    # learner's checkpoint (what is usually served), at the cost of updates below bf16's step
    checkpoint_dtype: str = "auto"
    progress: bool = True
    dist_timeout_s: float = 300.0  # under torchrun: longest wait on another rank before failing
    # experiment trackers (tao_fast/tracking.py): none, or some of REPORT_TO joined by commas
    # ("tensorboard,wandb"); files under the run directory, offline
    report_to: str = "none"
    # model.lora: besides the PEFT adapter in checkpoint-roundN/, the base with the adapter
    # merged in, an HF checkpoint in checkpoint-roundN/merged/ (run.checkpoint_dtype)
    merge_lora: bool = False

    REPORT_TO = ("tensorboard", "wandb", "trackio")  # not a field: the trackers' names

    def __post_init__(self):
        _check(self.dist_timeout_s > 0, "run.dist_timeout_s", "must be > 0")
        _check(self.steps >= 0, "run.steps", f"must be >= 0, got {self.steps}")
        _check(self.rounds >= 1, "run.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.threads >= 0, "run.threads", "must be >= 0")
        _check(self.save_every >= 0, "run.save_every", "must be >= 0")
        _check(self.keep_states >= 0, "run.keep_states", "must be >= 0")
        _one_of(self.checkpoint_dtype, ("auto", "float32", "bfloat16"), "run.checkpoint_dtype")
        for name in self.trackers:
            _check(name in self.REPORT_TO, "run.report_to",
                   f"must be none or some of {list(self.REPORT_TO)} joined by commas "
                   f"(e.g. tensorboard,wandb), got {self.report_to!r}")

    @property
    def trackers(self) -> tuple[str, ...]:
        """run.report_to's names, each once, in order; () for none."""
        names = [n.strip() for n in self.report_to.split(",")]
        return () if names == ["none"] else tuple(dict.fromkeys(names))


@dataclass
class TaoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _check(not self.run.merge_lora or self.model.lora.enabled, "run.merge_lora",
               "merges a LoRA adapter into its base: set model.lora.rank > 0 (a full-weight "
               "run's checkpoint is the whole model already)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, tp, key: str):
    """value checked (and int->float widened) against the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a, key)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if tp in (int, float) and isinstance(value, str):  # YAML reads "3e-5" as a string
        try:
            value = tp(value.strip())
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is dict and isinstance(value, dict):
        return value
    if tp is list and isinstance(value, list):
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"{key}: unknown key (known: {sorted(names)})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {v!r}")
            kwargs[k] = _build(tp, v, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _set_path(d: dict, dotted: str, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    d[parts[-1]] = value


def parse_override(item: str) -> tuple[str, object]:
    """'rl.lr=1e-5' -> ('rl.lr', 1e-05); the value is read as YAML (numbers, bools, strings)."""
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, list) and not all(isinstance(v, dict) for v in value) or value == []:
        value = raw  # a string such as "[x]" stays a string; a mapping ({type: ...}) stays
        # one, and so does a list of mappings (data.train=[{source: a.jsonl, weight: 2}, ...])
    return key.strip(), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML itself keeps the
    last one silently, so a repeated section would drop the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key_node.tag != "tag:yaml.org,2002:merge" and key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key "
                                  f"{key!r} (first at line {seen[key] + 1})")
            seen.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep)


def _decode(path: Path, data: bytes) -> str:
    """The file's text; a non-UTF-8 byte is a ConfigError naming its line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (column {col})") from None


def read_config_file(path) -> dict:
    """A YAML or TOML config file -> {section: {key: value}}. Errors are ConfigErrors naming
    the file (and line): missing, not UTF-8, unparsable, a key given twice, not a mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = _decode(path, path.read_bytes())
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)  # refuses duplicate keys and tables itself
        else:
            loader = _UniqueKeyLoader(text)
            loader.name = str(path)
            try:
                data = loader.get_single_data() or {}
            finally:
                loader.dispose()
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as e:  # one line: where, and what (not yaml's source excerpt)
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{path}: cannot parse: {where}{what}") from None
    except Exception as e:  # noqa: BLE001 - tomllib's message names the line
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(path=None, overrides=(), base: dict | None = None,
                values: dict | None = None) -> TaoConfig:
    """Defaults <- `base` <- file <- overrides <- `values`, checked; errors name the key (and
    file). base and values map dotted keys to values taken as they are (not parsed)."""
    data: dict = {}
    for k, v in (base or {}).items():
        _set_path(data, k, v)
    if path is not None:
        for sec, vals in read_config_file(path).items():
            if isinstance(vals, dict):
                for k, v in vals.items():
                    _set_path(data, f"{sec}.{k}", v)
            else:
                _set_path(data, sec, vals)
    for item in overrides:
        k, v = parse_override(item)
        _set_path(data, k, v)
    for k, v in (values or {}).items():
        _set_path(data, k, v)
    try:
        return _build(TaoConfig, data, "")
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e} (from the file or a key=value override)") from None


def save_config(cfg: TaoConfig, path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
