"""vLLM rollout engine, in the learner's own process (the Engine protocol of tao_fast.rollout).

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, compat.py), so its model lives next to
the learner and the two can share weight memory. Per round:

    generate (N candidates per prompt, sampled tokens' log-probs *after* temperature/top-p:
              logprobs_mode="processed_logprobs", what the learner's importance ratio compares to)
    sleep    (free only vLLM's KV cache; the learner's optimizer state and activations use it)
    train
    load_weights (bring the new weights into vLLM, reset its prefix cache)
    wake     (the KV cache comes back)

The weight-sync paths (alias / cast / reload, `engine.sync_path`) are in weights.py; a LoRA
learner's (model.lora: vLLM with enable_lora, the base bound once, then only the adapter:
lora-memory / lora-disk) in adapter.py; the sleep paths (`engine.sleep_path`: cuda-kv-cache /
cpu-kv-free / none) in kv.py. Under torchrun
(tao_fast.rl.distributed active) the engine uses vLLM's external launcher: each rank is one vLLM
worker in torchrun's process group. `rollout.tensor_parallel` ranks make one engine (TP shards;
they must get the same prompts, see rl/rollout_shards.generate_and_score) and the world /
tensor_parallel engines are vLLM's data parallelism. vLLM's own log level defaults to ERROR
here (VLLM_LOGGING_LEVEL overrides).
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from tao_fast.config import ConfigError, RolloutConfig
from tao_fast.dtypes import dtype_name, sampler_dtype
from tao_fast.models.config import SUPPORTED_ARCHS
from tao_fast.profiling.memory import PeakMemory
from tao_fast.rl import distributed as dist_
from tao_fast.rl import fsdp
from tao_fast.rollout.protocol import (
    Engine,
    Rollouts,
    SamplingParams,
    check_prompts,
    decode_response,
    stop_token_ids,
)
from tao_fast.models import lora
from tao_fast.rollout.vllm import adapter, compat, kv, weights

CPU_KV_BYTES = 2**30  # the CPU backend's memory share is of all RAM: its cache is sized instead


class VllmEngine(Engine):
    """Rollouts from vLLM, colocated with `learner` (a tao_fast Transformer) in this process."""

    name = "vllm"

    def __init__(self, model_dir, learner, tokenizer, ro: RolloutConfig, *, seed: int):
        """model_dir: the HF directory vLLM loads (load_model's third result); learner: the
        tao_fast Transformer whose weights vLLM serves (shared or synced, rollout.weight_sync);
        ro: the checked rollout section (dtype, memory, eager, weight_sync, tensor_parallel);
        seed: vLLM's seed. A platform or model vLLM cannot serve is a ConfigError naming the key."""
        self.llm = None
        vllm = compat.import_vllm()
        from vllm.platforms import current_platform

        self.vllm_version = vllm.__version__
        self.tokenizer, self.learner, self.args = tokenizer, learner, learner.args
        self.lora = learner.lora_config  # model.lora: vLLM serves the base + the adapter
        self.adapter: adapter.AdapterSync | None = None
        self.on_cpu = current_platform.is_cpu()
        self.device = torch.device("cpu") if self.on_cpu else dist_.device()
        self.dtype = sampler_dtype(ro.dtype, learner.embed_tokens.weight.dtype, self.device)
        world = dist_.world_size() if dist_.active() else 1
        _check_world(world, ro.tensor_parallel)
        self.tensor_parallel = ro.tensor_parallel
        # vLLM's data-parallel engines step together (an all-reduce per step): every rank must
        # make the same sequence of generate() calls, with no prompts if it has none
        self.lockstep = world // ro.tensor_parallel > 1
        self.weight_sync = weights.resolve_sync(ro, self.on_cpu)
        self.eos_ids = stop_token_ids(self.args, tokenizer)
        self.max_context = ro.max_model_len or self.args.max_position_embeddings
        model_dir = Path(model_dir)
        _check_architecture(model_dir, vllm.__version__)
        kv_bytes = int(ro.kv_cache_gb * 2**30) if ro.kv_cache_gb > 0 else (
            CPU_KV_BYTES if self.on_cpu else None)
        self._check_memory(ro, kv_bytes)
        kv_kind = kv.choose(self.on_cpu, current_platform.is_sleep_mode_available())
        self.sleep_path = kv_kind.path
        t0 = time.perf_counter()
        self.llm = _start(vllm, self._llm_kwargs(model_dir, ro, seed, kv_bytes, world,
                                                 kv_kind.sleep_mode), ro)
        self.start_seconds = time.perf_counter() - t0
        self._asleep = False
        self.stats: dict = {}
        self._attach(kv_kind, ro, model_dir)
        # resumed / non-disk weights go in now; a sharded (FSDP) learner, which only a TP
        # engine gets (reload sync), is gathered one tensor at a time (every rank is here)
        self.load_weights(fsdp.full_named_parameters(learner) if fsdp.is_sharded(learner)
                          else learner.named_parameters())

    def _attach(self, kv_kind: type[kv.KvSleep], ro: RolloutConfig, model_dir: Path) -> None:
        """Once vLLM runs: its model runner and model, the KV-cache sleep path, the learner's
        tensors bound to vLLM's (`sync`, `sync_path`) and, with LoRA, the adapter's path."""
        worker = self.llm.collective_rpc(lambda w: w)[0]
        # in-process, vLLM 0.32 hands back its worker wrapper (the worker under `.worker`) on
        # some platforms and the worker itself on others
        self._runner = getattr(worker, "worker", worker).model_runner
        self._vmodel = self._runner.model
        self.kv = kv_kind(self.llm, self._runner, self.device)
        self.sync = weights.bind(self.llm, self._vmodel, self.learner, self.weight_sync,
                                 self.dtype, self.device)
        self.sync_path = self.sync.path
        if self.lora is not None:
            self.adapter = adapter.AdapterSync(self.llm, self._runner, self.lora,
                                               str(model_dir), ro.lora_sync)

    def _llm_kwargs(self, model_dir: Path, ro: RolloutConfig, seed: int, kv_bytes: int | None,
                    world: int, sleep_mode: bool) -> dict:
        """vllm.LLM's arguments for this engine."""
        # rollout.enforce_eager=auto: eager on CPU (compiling costs ~100 s at start); on a GPU
        # CUDA graphs pay
        eager = self.on_cpu if ro.enforce_eager == "auto" else ro.enforce_eager
        kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype_name(self.dtype),
                      seed=seed, **(adapter.vllm_lora_kwargs(self.lora) if self.lora else {}),
                      enforce_eager=bool(eager), logprobs_mode="processed_logprobs",
                      gpu_memory_utilization=ro.gpu_memory_utilization,
                      enable_prefix_caching=True, enable_sleep_mode=sleep_mode)
        if world > 1:  # under torchrun: each rank is one vLLM worker (torchrun's own ranks
            # and process group, no extra processes); world = tensor_parallel x data parallel
            kwargs.update(distributed_executor_backend="external_launcher",
                          tensor_parallel_size=ro.tensor_parallel)
            if world // ro.tensor_parallel > 1:
                kwargs["data_parallel_size"] = world // ro.tensor_parallel
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        if ro.max_model_len:
            kwargs["max_model_len"] = ro.max_model_len
        if self.on_cpu:
            # No chunked prefill on the CPU backend: vLLM 0.32 rewinds a seeded request's
            # generator after a partial (chunked) prefill with Generator.set_offset, which CPU
            # generators lack ("RuntimeError: CPU Generator does not use offset"); seen with
            # the demo's 200 held-out prompts sampled with a seed (8k prompt tokens > the 2,048
            # token budget of a step). Unchunked, a step's budget must hold a whole prompt.
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(2048, self.max_context))
        return kwargs

    def _check_memory(self, ro: RolloutConfig, kv_bytes: int | None) -> None:
        """What vLLM will ask for fits: the KV cache in free RAM (CPU), the share of the GPU in
        its free memory (the learner holds the rest)."""
        if self.on_cpu:
            import psutil

            avail = psutil.virtual_memory().available
            if kv_bytes is not None and kv_bytes > avail:
                raise ConfigError(f"rollout.kv_cache_gb: a {kv_bytes / 2**30:.1f} GiB KV cache "
                                  f"does not fit in the {avail / 2**30:.1f} GiB of free RAM")
            return
        free, total = torch.cuda.mem_get_info(self.device)
        want = ro.gpu_memory_utilization * total
        if kv_bytes is None and want > free:
            raise ConfigError(
                f"rollout.gpu_memory_utilization={ro.gpu_memory_utilization}: vLLM would take "
                f"{want / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB, but only "
                f"{free / 2**30:.1f} GiB is free (the learner holds the rest): lower the share "
                f"or set rollout.kv_cache_gb")

    # ----------------------------------------------------------------- Engine protocol
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Bring the learner's weights (its fused names) into vLLM in place (the bound sync
        path); with LoRA, adapter tensors go to vLLM's LoRA slot (the adapter's path) and base
        tensors, given once at the start, to the base. Resets the prefix cache. `stats` gets
        sync_seconds and sync_path."""
        t0 = time.perf_counter()
        base, adapters = [], []
        for n, t in named_tensors:
            (adapters if lora.is_adapter(n) else base).append((n, t))
        # the reload path reads the base from model_dir itself; a LoRA base never changes
        if base and not (self.lora is not None and self.sync.path == "reload"):
            self.sync.load(base)
        if adapters:
            self.adapter.load(adapters)
            self.sync_path = self.adapter.path
        self.llm.reset_prefix_cache()
        self.stats.update(sync_seconds=time.perf_counter() - t0, sync_path=self.sync_path)

    def sleep(self) -> None:
        """Free vLLM's KV cache (only it: the weights are shared with the learner)."""
        if self._asleep:
            return
        t0 = time.perf_counter()
        freed = self.kv.sleep()
        self._asleep = True
        self.stats.update(sleep_seconds=time.perf_counter() - t0, kv_freed_mb=freed / 2**20,
                          sleep_path=self.sleep_path)

    def wake(self) -> None:
        """Take the KV cache back (zeroed) and reset the prefix cache."""
        if not self._asleep:
            return
        t0 = time.perf_counter()
        self.kv.wake()
        self.llm.reset_prefix_cache()
        self._asleep = False
        self.stats.update(wake_seconds=time.perf_counter() - t0)

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams,
                 progress: bool = False) -> Rollouts:
        """P prompts (token ids) -> Rollouts [P][sampling.n], log-probs after temperature and
        top-p, stats with peak_memory_mb. Wakes a sleeping KV cache; under lockstep an empty
        list still takes its step with the other data-parallel engines."""
        if self._asleep:
            self.wake()
        if not prompts:  # a data-parallel engine still takes its part in the others' steps
            if self.lockstep:
                self.llm.generate([], use_tqdm=False)
            return Rollouts.empty()
        check_prompts(prompts, sampling.max_tokens, self.max_context)
        t0 = time.perf_counter()
        with PeakMemory(self.device) as peak:
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                     self._vllm_sampling(sampling), use_tqdm=progress,
                                     lora_request=self.adapter and self.adapter.request)
        secs = time.perf_counter() - t0
        ro = self._rollouts(prompts, outs)
        ntok = ro.num_tokens
        ro.stats = {"tokens": ntok, "seconds": secs, "tokens_per_s": ntok / secs,
                    "peak_memory_mb": peak.peak_mb}
        return ro

    def _vllm_sampling(self, sp: SamplingParams):
        """vLLM's SamplingParams: the sampled token's log-prob only (logprobs=0), our stops
        with the model's EOS, no detokenizing (texts are decoded without the EOS here)."""
        from vllm import SamplingParams as VSP

        return VSP(n=sp.n, temperature=sp.temperature, top_p=sp.top_p,
                   max_tokens=sp.max_tokens, seed=sp.seed, logprobs=0,
                   stop_token_ids=sorted(set(self.eos_ids) | set(sp.stop_token_ids)),
                   detokenize=False)

    def _rollouts(self, prompts: Sequence[list[int]], outs) -> Rollouts:
        """vLLM's RequestOutputs (one per prompt, candidates by index) -> Rollouts."""
        toks, lps, reasons, texts = [], [], [], []
        for o in outs:
            cands = sorted(o.outputs, key=lambda c: c.index)
            ids = [list(c.token_ids) for c in cands]  # [N][response_len]
            toks.append(ids)
            lps.append([[float(pos[t].logprob) for t, pos in zip(i, c.logprobs)]
                        for i, c in zip(ids, cands)])
            reasons.append(["length" if c.finish_reason == "length" else "stop" for c in cands])
            texts.append([decode_response(self.tokenizer, i, self.eos_ids) for i in ids])
        return Rollouts(prompt_ids=[list(p) for p in prompts], token_ids=toks, texts=texts,
                        logprobs=lps, finish_reasons=reasons)

    def close(self) -> None:
        """Release vLLM's engine (tests and benchmarks that start several)."""
        if self.llm is None:
            return
        if self.adapter is not None:
            self.adapter.close()
        try:
            self.llm.llm_engine.engine_core.shutdown()  # vLLM 0.32's in-process engine core
        except Exception:  # noqa: BLE001
            pass
        self.llm = None


def _check_world(world: int, tensor_parallel: int) -> None:
    """vLLM's tensor-parallel groups are made of torchrun's ranks: the world must split."""
    if world % tensor_parallel:
        raise ConfigError(f"rollout.tensor_parallel={tensor_parallel}: vLLM's tensor-parallel "
                          f"groups are made of torchrun's ranks, and {world} rank(s) do not "
                          f"split into groups of {tensor_parallel}"
                          + ("; launch with torchrun --nproc-per-node N" if world == 1 else ""))


def _check_architecture(model_dir: Path, version: str) -> None:
    """The model is one vLLM loads and one whose fused layout tao-fast maps (SUPPORTED_ARCHS)."""
    from vllm import ModelRegistry

    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in archs):
        raise ConfigError(f"model.path: {model_dir}: architecture {archs or '?'} cannot be "
                          f"loaded by vLLM {version}; use rollout.engine=torch")
    bad = [a for a in archs if a not in SUPPORTED_ARCHS]
    if bad:
        raise ConfigError(f"model.path: {model_dir}: architecture {bad} has no fused-layout "
                          f"mapping to vLLM in tao-fast (Llama, Qwen2); use rollout.engine=torch")


def _start(vllm, kwargs: dict, ro: RolloutConfig):
    """vllm.LLM(**kwargs), keeping the caller's global RNG states and torch thread settings
    (vLLM seeds the RNGs of the process it runs in; its CPU worker replaces
    torch.set_num_threads with a no-op). Not getting its memory is a ConfigError."""
    rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    set_threads = torch.set_num_threads
    try:
        return vllm.LLM(**kwargs)
    except Exception as e:
        msg = str(e)
        if "memory" in msg.lower() or "kv cache" in msg.lower():
            raise ConfigError(
                f"rollout.gpu_memory_utilization={ro.gpu_memory_utilization} / rollout."
                f"kv_cache_gb={ro.kv_cache_gb}: vLLM cannot get the memory it was asked for: "
                f"{msg.splitlines()[0] if msg else type(e).__name__}") from e
        raise
    finally:
        torch.set_num_threads = set_threads  # in-process it binds no threads: the learner
        # keeps its own thread settings
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])
