#!/usr/bin/env bash
# The prepared GPU check, one run of under 8 minutes on one GPU (docs/performance.md, "On a GPU"):
#   1. benchmarks/efficiency.py on the LLaMA-2-7B shape with random bf16 weights: base, alignx (soft and top-1,
#      batch 1 merged and batch 8 per-example), merge-linear, moe-dense and PEFT's mixed-adapter batch, side by
#      side, with peak memory from torch.cuda.max_memory_allocated;
#   2. whether vLLM imports there, for the hand-off (alignx serve --backend vllm). The lent H200's image has no
#      vLLM, and its wheels are far above what a device call carries (64 MiB), so the hand-off stays tested
#      against a fake vllm module (tests/serving/test_vllm_backend.py) until a machine with vLLM is at hand.
# Everything it prints and writes goes to $OUT (default benchmarks/results/gpu).
#
# The machine needs torch with CUDA, transformers, peft, safetensors and accelerate (the lent H200's image has
# them) and AlignX's other dependencies: where they are missing, carry them as wheels in .whl/ (the device
# tool's README) and this script installs them first.
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" - <<'EOF' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} cuda={torch.version.cuda}")
EOF
timeout 360 "$PYTHON" benchmarks/efficiency.py --shape llama2-7b --random-weights --quick --device cuda \
  --out "$OUT/efficiency" 2>&1 | tee "$OUT/efficiency.log"
"$PYTHON" -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1 | tee "$OUT/vllm.txt" || true
