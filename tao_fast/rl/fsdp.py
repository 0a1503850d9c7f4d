"""FSDP2 for the learner: sharding the model, gathering whole tensors and states from the shards,
loading 1-rank states into them, and the choice between DDP and FSDP (`rl.parallel`).

Every gather here is a collective: under FSDP each rank must make the same calls, in the same
order. A failed one raises DistributedError (tao_fast.rl.distributed) naming what was gathered.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tao_fast.rl.distributed import collective, is_main

if TYPE_CHECKING:
    from tao_fast.models.llama import Transformer


def fully_shard_model(model: torch.nn.Module, ignored=()) -> torch.nn.Module:
    """FSDP2 over all ranks: each decoder layer's attention and MLP are their own units (the
    model calls them, not Block.forward, so that is where FSDP's hooks must sit), then the
    root (embedding, norms, lm_head). Gradients are reduce-scattered as a SUM (divide factor
    1): the trainer's loss weights come from global counts, so the sum is the 1-rank gradient.
    `ignored` parameters stay whole on every rank (LoRA's adapters: the caller all-reduces
    their gradients)."""
    from torch.distributed.fsdp import fully_shard

    units = [m for blk in model.layers for m in (blk.self_attn, blk.mlp)]
    ignored = set(ignored)
    for m in units:
        fully_shard(m, ignored_params=ignored or None)
    fully_shard(model, ignored_params=ignored or None)
    for m in [*units, model]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor on every rank (a collective); others unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_named_parameters(model: torch.nn.Module):
    """(name, full tensor) for every parameter; under FSDP every rank must iterate it fully,
    in the same order (each parameter is one all-gather)."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        if isinstance(p, DTensor):  # an ignored parameter (LoRA's adapters) is whole already
            yield name, collective(f"gathering {name}", full_tensor, p.detach())
        else:
            yield name, p.detach()


def _sd_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """FSDP: {"model_state": {name: tensor}, "opt_state": optimizer.state_dict()-shaped dict}
    gathered to rank 0 on the CPU (other ranks get {}); a collective. Optimizer keys go from
    parameter names back to indices, so the files are the same as a 1-rank run's."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    msd = collective("gathering the model state", get_model_state_dict, model,
                     options=_sd_options())
    osd = collective("gathering the optimizer state", get_optimizer_state_dict, model, opt,
                     options=_sd_options())
    if not is_main():
        return {}
    ids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    osd = {"state": {ids[k]: v for k, v in osd["state"].items()},
           "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                            for g in osd["param_groups"]]}
    return {"model_state": msd, "opt_state": osd}


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, weights: dict,
                    opt_state: dict) -> None:
    """FSDP: load a 1-rank-format state (every rank read the same files) into the shards; a
    collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = [name for name, _ in model.named_parameters()]
    osd = {"state": {names[int(i)]: v for i, v in opt_state["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                            for g in opt_state["param_groups"]]}
    opts = StateDictOptions(full_state_dict=True)
    collective("loading the model state", set_model_state_dict, model, weights, options=opts)
    collective("loading the optimizer state", set_optimizer_state_dict, model, opt, osd,
               options=opts)


def choose_parallel(mode: str, model: Transformer, micro_batch_tokens: int,
                    device_bytes: int | None = None) -> str:
    """rl.parallel -> "ddp" | "fsdp". auto: DDP where a whole replica fits, i.e. the
    accounting's peak (rl/memory.py: weights, gradients, AdamW, activations of one
    micro-batch) is under 85% of the device; FSDP2 otherwise. On the CPU (no device limit
    known, device_bytes None) auto is DDP."""
    if mode in ("ddp", "fsdp"):
        return mode
    dev = next(model.parameters()).device
    if device_bytes is None and dev.type == "cuda":
        device_bytes = torch.cuda.get_device_properties(dev).total_memory
    if device_bytes is None:
        return "ddp"
    from tao_fast.rl.memory import Shape, learner_bytes

    p = next(model.parameters())
    lo = model.lora_config  # LoRA: the frozen base in its dtype, fp32 adapters
    need = learner_bytes(Shape.from_args(model.args), micro_batch_tokens,
                         master_bytes=p.element_size(), act_bytes=min(p.element_size(), 2),
                         checkpointing=bool(model.gradient_checkpointing),
                         lora_rank=lo.rank if lo else 0, base_bytes=p.element_size(),
                         lora_targets=lo.targets if lo else "all-linear")
    return "ddp" if need["peak"] <= 0.85 * device_bytes else "fsdp"
