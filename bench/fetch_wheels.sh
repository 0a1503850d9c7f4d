#!/usr/bin/env bash
# Download the pure-Python peer wheels that bench/device_run.sh installs on a lent GPU machine
# (which has no network and no package registry) into .whl/ (git-ignored: /.whl/ in .gitignore).
# Run it from anywhere, on a machine that reaches PyPI; then name .whl in the device call's
# carry list. Pinned versions; their requirements (torch, triton) are on the GPU image already
# (see /work/.library/device/KINDS.md's package list), so nothing else is fetched.
#   liger-kernel 0.8.5        LigerFusedLinearCrossEntropyLoss, the fused linear GRPO loss,
#                             the Qwen2 patches (bench/gpu_loss_kernels.py, gpu_learner_step.py)
#   cut-cross-entropy 25.1.1  linear_cross_entropy (bench/gpu_loss_kernels.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -ch .whl/*.whl | tail -1
