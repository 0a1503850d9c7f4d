"""The learner's weights into vLLM: binding its tensors to vLLM's once, then each sync
(rollout.weight_sync; the path that runs is the engine's `sync_path`).

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
- "auto": "shared" on a GPU; on the CPU backend `CPU_AUTO_SYNC` (measured: "shared"); "reload"
  under tensor parallelism (a TP shard cannot alias the learner's whole tensors).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from tao_fast.config import RolloutConfig
from tao_fast.models.config import ModelArgs
from tao_fast.models.lora import is_adapter
from tao_fast.models.weights import hf_name, to_hf

# weight_sync=auto on the CPU backend. Measured (bench/bench_rollout.py, bench/RESULTS.md): the
# packed GEMMs and F.linear give the same log-probs; packed generates ~10% faster, a shared sync
# is 5-25x faster than a reload; per step of the demo's size they cancel, and sharing is the design
CPU_AUTO_SYNC = "shared"
_EMBED = "model.embed_tokens.weight"
BASE_LAYER = ".base_layer"  # vLLM's LoRA layers hold the layer they wrap under this name


def resolve_sync(ro: RolloutConfig, on_cpu: bool) -> str:
    """rollout.weight_sync with "auto" made "shared" or "reload" (see the module docstring).
    The config has already refused shared with tensor_parallel > 1."""
    if ro.weight_sync != "auto":
        return ro.weight_sync
    if ro.tensor_parallel > 1:  # a TP shard cannot alias the learner's whole tensors
        return "reload"
    return CPU_AUTO_SYNC if on_cpu else "shared"


def reload_iterator(named_tensors: Iterable[tuple[str, torch.Tensor]], args: ModelArgs,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The learner's fused (name, tensor) pairs -> HF checkpoint names, cast to vLLM's dtype:
    what vLLM's `reload_weights(weights_iterator=...)` reads. Fused tensors are split as views."""
    return ((n, t.detach().to(dtype)) for n, t in to_hf(named_tensors, args))


class WeightSync(Protocol):
    """One bound sync path: `path` names it, load() brings the learner's weights in place."""

    path: str

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


class ReloadSync:
    """vLLM's own reload from the learner's tensors (vLLM keeps its weights, packed on CPU)."""

    path = "reload"

    def __init__(self, llm, vmodel, args: ModelArgs, dtype: torch.dtype, on_cpu: bool):
        self.llm, self.vmodel, self.args, self.dtype = llm, vmodel, args, dtype
        # a tied LM head loads nothing itself, so on the CPU backend the reload leaves its
        # packed GEMM built from the old embedding: it is packed again after each reload
        self.repack_head = on_cpu and args.tie_word_embeddings

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": reload_iterator(named_tensors, self.args, self.dtype),
            "is_checkpoint_format": True})
        if self.repack_head:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            # vLLM 0.32's Llama/Qwen2 models hold `lm_head` on the last pipeline stage only;
            # `cpu_linear` marks a layer the CPU backend packed
            head = getattr(self.vmodel, "lm_head", None)
            if head is not None and hasattr(head, "cpu_linear"):
                dispatch_cpu_unquantized_gemm(head, remove_weight=False)


class SharedSync:
    """In-place copies into vLLM's tensors (`targets`, by the learner's names); a tensor the
    learner already shares (same storage: "alias") costs nothing."""

    def __init__(self, targets: dict[str, torch.Tensor], aliased: int, device: torch.device):
        self.targets, self.aliased, self.device = targets, aliased, device
        self.path = "alias" if aliased == len(targets) else "cast"
        self.inference = any(t.is_inference() for t in targets.values())

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        with torch.inference_mode() if self.inference else torch.no_grad():
            for name, t in named_tensors:
                dst = self.targets.get(name)
                if dst is None:
                    raise KeyError(f"load_weights: unknown parameter {name!r}")
                if dst.data_ptr() != t.data_ptr():
                    dst.copy_(t.detach(), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are done before vLLM reads them


def vllm_parameters(vmodel) -> dict[str, torch.Tensor]:
    """vLLM's parameters by HF name: with enable_lora, vLLM wraps each linear (and the
    embedding) and its weight is `<name>.base_layer.weight`; the base is the same tensor."""
    return {n.replace(BASE_LAYER, ""): p for n, p in vmodel.named_parameters()}


def bind(llm, vmodel, learner, weight_sync: str, dtype: torch.dtype,
         device: torch.device) -> WeightSync:
    """Map each learner parameter to its vLLM tensor and set up `weight_sync` (resolved:
    "shared" | "reload"). vmodel: vLLM's model (its runner's `.model`); learner: a tao_fast
    Transformer. Shared on the CPU backend unpacks vLLM's packed linears first."""
    vparams = vllm_parameters(vmodel)
    named = {n: p for n, p in learner.named_parameters() if not is_adapter(n)}  # the base
    missing = [n for n in named if hf_name(n) not in vparams]
    if missing:
        raise RuntimeError(f"vLLM's {type(vmodel).__name__} has no parameter for "
                           f"{missing[:4]} (expected the fused Llama/Qwen2 layout)")
    if weight_sync == "reload":
        return ReloadSync(llm, vmodel, learner.args, dtype, device.type == "cpu")
    if device.type == "cpu":
        unpack_cpu_linears(vmodel, named, dtype)
        vparams = vllm_parameters(vmodel)
    targets, aliased = _shared_targets(vparams, named)
    return SharedSync(targets, aliased, device)


def _shared_targets(vparams: dict, named: dict) -> tuple[dict[str, torch.Tensor], int]:
    """(learner name -> vLLM tensor, how many the learner now aliases). Where dtype, device
    and layout match, the learner adopts vLLM's storage: pointers vLLM (and its CUDA graphs)
    captured stay valid."""
    targets, aliased = {}, 0
    with torch.no_grad():
        for n, p in named.items():
            dst = vparams[hf_name(n)].data
            if dst.shape[0] > p.shape[0] and dst.shape[1:] == p.shape[1:]:
                dst = dst[:p.shape[0]]  # vocab rows padded by vLLM
            if dst.shape != p.shape:
                raise RuntimeError(f"{n}: learner {tuple(p.shape)} vs vLLM {tuple(dst.shape)}")
            if (dst.dtype == p.dtype and dst.device == p.device and not dst.is_inference()
                    and dst.is_contiguous()):
                if dst.data_ptr() != p.data_ptr():
                    dst.copy_(p)
                    p.data = dst
                aliased += 1
            targets[n] = dst
    return targets, aliased


def unpack_cpu_linears(vmodel, named: dict, dtype: torch.dtype) -> None:
    """CPU backend: linear layers whose weight was packed away get a plain tensor again and
    torch's F.linear, so in-place updates reach the matmul (the tied LM head too). Values
    come in the first sync (alias or cast). named: the learner's named parameters."""
    import torch.nn.functional as F

    by_vllm = {hf_name(n): p for n, p in named.items()}
    for name, mod in vmodel.named_modules():
        name = name.replace(BASE_LAYER, "")  # enable_lora's wrapped linear: its base layer
        # vLLM 0.32's CPU backend marks the layers it packed with `cpu_linear` (the GEMM it
        # calls) and keeps `weight` as a Parameter, emptied when the packed copy replaced it.
        # A LoRA wrapper shows its base layer's `weight` and `cpu_linear` without owning them:
        # only the layer whose Parameter it is gets unpacked
        if not hasattr(mod, "cpu_linear") or mod._parameters.get("weight") is None:
            continue
        if mod.weight.numel() == 0:
            src = by_vllm.get(name + ".weight", by_vllm.get(_EMBED) if name == "lm_head"
                              else None)
            if src is None:
                raise RuntimeError(f"vLLM layer {name} has packed weights and no learner twin")
            mod.weight = torch.nn.Parameter(torch.empty(src.shape, dtype=dtype),
                                            requires_grad=False)
        mod.cpu_linear = F.linear
        bias = getattr(mod, "bias", None)  # vLLM 0.32 linears: a Parameter or None
        if bias is not None and bias.dtype != dtype:
            bias.data = bias.data.to(dtype)
