"""vLLM's own OpenAI server as `tao-fast serve --engine vllm` starts it
(tao_fast/serve/vllm_server.py): start time (spawn -> /health 200), chat latency at 1 / 16 / 64 generated tokens (median of
--repeats, greedy, ignore_eos), and stop time.

    python bench/bench_vllm_server.py [--model DIR] [--repeats 4]

--model defaults to the embedded SmolLM2-135M-Instruct's cached safetensors directory.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded model's)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    args = ap.parse_args()
    import openai

    from tao_fast.models.loader import resolve_model_path
    from tao_fast.serve.vllm_server import VllmServer

    model = args.model or str(resolve_model_path("embedded:smollm2-135m-instruct"))
    srv = VllmServer(model, served_name="m", kv_cache_gb=args.kv_cache_gb, max_model_len=2048)
    srv.start()
    print(f"start {srv.start_seconds:.1f} s ({model})", flush=True)
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
        msgs = [{"role": "user", "content": "What is 23 + 45? Answer briefly."}]
        for max_tokens in (1, 16, 64):
            times = []
            for _ in range(args.repeats):
                t = time.monotonic()
                r = client.chat.completions.create(model="m", messages=msgs,
                                                   max_tokens=max_tokens, temperature=0,
                                                   extra_body={"ignore_eos": True})
                times.append(time.monotonic() - t)
            print(f"max_tokens={max_tokens}: median {1000 * statistics.median(times):.0f} ms "
                  f"(all {[round(1000 * x) for x in times]}), {r.usage.completion_tokens} tokens",
                  flush=True)
    finally:
        t = time.monotonic()
        srv.stop()
        print(f"stop {time.monotonic() - t:.1f} s")


if __name__ == "__main__":
    main()
