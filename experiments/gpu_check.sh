#!/usr/bin/env bash
# One-shot GPU check (< 8 minutes on one NVIDIA GPU). Installs the CUDA jax wheels matching the installed jax,
# runs the parity tests on the GPU, then experiments/gpu_check.py: forward / decode / train-step throughput of
# `small` and of a real-width layer (hidden 7168, 128 heads, 256 experts top-8) against HF on the same GPU, FP8
# matmuls (W8A8 blockwise, weight-only) against bf16 in TFLOP/s, the train step's MFU and decode's HBM-bandwidth
# utilisation. Writes one JSON (default experiments/results/gpu_check.json).
#
#   bash experiments/gpu_check.sh [OUT.json]
#   GPU_CHECK_SKIP_INSTALL=1 bash experiments/gpu_check.sh      # wheels already installed
#   python experiments/gpu_check.py --dry-run                     # the python part on CPU, tiny shapes (no GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/gpu_check.json}
LOG_DIR=$(mktemp -d)
START=$(date +%s)
left() { echo $((480 - ($(date +%s) - START))); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU found"; exit 1; }
JAX_VERSION=$(python -c "import jax; print(jax.__version__)")
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
  timeout 150 pip install -q "jax[cuda12]==${JAX_VERSION}" || echo "warning: jax[cuda12]==${JAX_VERSION} install failed"
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "torch has no CUDA: the HF columns will be skipped (install a CUDA torch wheel to fill them)"
  fi
fi
export JAX_PLATFORMS=cuda
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())" || exit 1

# Parity on the GPU: full-precision matmuls (no TF32) so the CPU tolerances apply.
PARITY_RC=0
JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 timeout $(( $(left) - 300 )) \
  python -m pytest -q -x -p no:cacheprovider tests/test_parity_hf.py tests/test_flash_attention.py tests/test_fp8.py \
  > "$LOG_DIR/parity.log" 2>&1 || PARITY_RC=$?
tail -3 "$LOG_DIR/parity.log"

timeout $(( $(left) - 10 )) python experiments/gpu_check.py --out "$OUT" --parity-rc "$PARITY_RC" \
  --parity-log "$LOG_DIR/parity.log" --budget-s $(( $(left) - 20 ))
echo "gpu_check: $(( $(date +%s) - START )) s, wrote $OUT"
