#!/usr/bin/env bash
# THE command for a lent H100/H200, from the repository root:
#     TAO_FAST_COMMIT=$(git rev-parse --short HEAD) bash bench/device_run.sh
# (the GPU machine gets a plain copy without .git: TAO_FAST_COMMIT puts the commit in every
# result). It fits 9 minutes of wall time: bench/gpu_suite.py runs the steps in order, each in
# its own process with its own time limit and log, and a step that fails or runs out of time
# never stops the next:
#   smoke      75 s   each Triton op once (bf16 and fp32) vs a float64 oracle: PASS / FAIL
#   loss      105 s   linear_logprob / pg_loss vs eager torch, Liger, CCE, cuBLAS (3 shapes)
#   attention  65 s   varlen attention: Triton vs padded SDPA (flash-attn if present)
#   learner   175 s   learner step (0.5B, 1.5B): tao-fast vs transformers and Liger
#   lora       65 s   LoRA (1.5B shape): log-probs vs float64, step time and memory vs full
# (FlexAttention, a peer, runs only with --only flex: the LoRA step took its place)
# = 485 s of limits + 5 s kill grace each + ~25 s probe and install: <= 535 s (gpu_suite.py's
# STEPS give each limit's estimate). Every row is printed and appended to $OUT/results.jsonl as
# it is measured; $OUT also gets summary.md (rewritten after each step) and one STEP.log per
# step: 7 files (the device tool returns at most 8).
# Peer wheels: when .whl/ holds wheels (bench/fetch_wheels.sh; carry .whl), they are installed
# into /tmp/site first. Extra arguments go to gpu_suite.py (e.g. --only smoke, --dry-run).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "device_run: the peer wheels did not install; their rows will say 'not importable'"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
  --format=csv 2>/dev/null || echo "device_run: nvidia-smi is not available"
# the suite stops each step at its own limit; this outer limit only catches the suite itself
timeout -k 5 "${DEVICE_RUN_LIMIT_S:-540}" "$PYTHON" bench/gpu_suite.py --out "$OUT" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "device_run: the suite ran past ${DEVICE_RUN_LIMIT_S:-540} s; every row written" \
       "before that is in $OUT/results.jsonl"
fi
exit "$rc"
