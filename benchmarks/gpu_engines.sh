#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and TensorRT 11: for each default model, calibrate W8A8 and W4A8, export the
# int8 and int4 QDQ graphs, build TensorRT engines with the FP16 fallback (layer tables + a shared timing cache),
# and run dq-verify on every engine (accuracy vs PyTorch fake-quant and FP, speed vs PyTorch on the same GPU).
#
#   pip install -e ".[trt]" --extra-index-url https://pypi.nvidia.com && benchmarks/gpu_engines.sh gpu-engines
#
# Writes OUT/<model>/<int8|int4>/{q.pt,unet.onnx,unet.plan,unet.plan.json,unet.plan.layers.json,report/} and
# OUT/README.md linking the reports. Existing q.pt files are reused (calibration is the slow, CPU-side step).
# Environment overrides: MODELS ("default default-cond"), STEPS (50), CALIB_SAMPLES (128), ITERS (20),
# BATCHES (1,4,8; within the engine's default batch profile 1..16).
set -euo pipefail

OUT=${1:-gpu-engines}
MODELS=${MODELS:-"default default-cond"}
STEPS=${STEPS:-50}
CALIB_SAMPLES=${CALIB_SAMPLES:-128}
ITERS=${ITERS:-20}
BATCHES=${BATCHES:-1,4,8}

# Fail in seconds, not after calibration, when TensorRT 11 or the GPU is missing (one line, what to install).
python - <<'EOF'
import sys
from dilatequant.engines.tensorrt.env import require_trt_and_gpu
from dilatequant.core.errors import UserError
try:
    trt, gpu = require_trt_and_gpu()
except UserError as err:
    sys.exit(f"error: {err}")
print(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability})")
EOF

mkdir -p "$OUT"
index="$OUT/README.md"
printf '# TensorRT 11 engines: int8 and int4 with FP16 fallback\n\n| model | precision | engine | report |\n|---|---|---|---|\n' > "$index"

for model in $MODELS; do
  for precision in int8 int4; do
    bits=W8A8; [ "$precision" = int4 ] && bits=W4A8
    dir="$OUT/$model/$precision"
    mkdir -p "$dir"
    echo "== $model $precision ($bits) -> $dir"
    if [ ! -f "$dir/q.pt" ]; then
      dq-calibrate --model "$model" --bits "$bits" --sym --steps "$STEPS" --calib-samples "$CALIB_SAMPLES" \
        --iters "$ITERS" --out "$dir/q.pt"
    fi
    dq-export --ckpt "$dir/q.pt" --onnx "$dir/unet.onnx" --precision "$precision"
    dq-build-engine --onnx "$dir/unet.onnx" --engine "$dir/unet.plan" --fp16-fallback --inspect \
      --timing-cache "$OUT/timing.cache"  # profile: batch 1/4/16 (opt 4), the rest from the graph
    dq-verify --ckpt "$dir/q.pt" --engine "$dir/unet.plan" --report "$dir/report" --batch "$BATCHES" --device cuda
    printf '| %s | %s (%s) | [unet.plan.json](%s/%s/unet.plan.json) | [report](%s/%s/report/) |\n' \
      "$model" "$precision" "$bits" "$model" "$precision" "$model" "$precision" >> "$index"
  done
done
echo "done: $index"
