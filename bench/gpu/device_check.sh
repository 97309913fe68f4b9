#!/usr/bin/env bash
# The CUDA checks and GPU figures of the fast path, in one run on a GPU machine that has PyTorch and Triton
# (nothing is installed: the repository is put on PYTHONPATH). Each part has its own time limit, so the whole
# run ends within about 10 minutes and whatever finished is kept:
#   1. the gpu-marked tests (kernels against the reference at real sizes, graphs captured and replayed, cache
#      sizing from the warm-up, structured outputs and prompt scoring on the GPU); the real-model tests need
#      the GGUF files installed and are left out here
#   2. decode attention per layer at the 12b and 27b head shapes (bench/gpu/decode_attention.py), with a bf16
#      cache, then a few cells with the cache stored in int8, fp8_e4m3 and int4 against bf16
#   3. end to end on the random 12b-shaped model at 8k and 32k (bench/gpu/serving_throughput.py)
# Usage, from the repository root: bash bench/gpu/device_check.sh [RESULTS_DIR]   (default: $OUT, else
# bench/results). Logs and JSON go to RESULTS_DIR.
set -uo pipefail
results=${1:-${OUT:-bench/results}}
mkdir -p "$results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'EOF' 2>&1 | tee "$results/device.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())
EOF

timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -k "not real_models" \
    tests/cache/test_triton_backend.py tests/cache/test_triton_prefill.py tests/engine/test_cuda_graphs.py tests/engine/test_cache_sizing.py \
    tests/engine/test_structured.py \
    2>&1 | tee "$results/gpu_tests.log"

timeout 100 python3 bench/gpu/decode_attention.py --shapes 12b 27b --batches 1 32 128 \
    --contexts 1024 8192 32768 131072 --ranks 1 2 --out "$results/gpu_decode_attention.json" \
    2>&1 | tee "$results/gpu_decode_attention.log"

timeout 50 python3 bench/gpu/decode_attention.py --shapes 12b 27b --batches 32 --contexts 32768 --ranks 1 \
    --cache-dtypes auto int8 fp8_e4m3 int4 --out "$results/gpu_decode_attention_quantized.json" \
    2>&1 | tee "$results/gpu_decode_attention_quantized.log"

timeout 170 python3 bench/gpu/serving_throughput.py --models 12b --contexts 8192 32768 --max-sessions 64 \
    --max-tokens 32 --no-vllm --out "$results/gpu_serving_throughput.json" \
    2>&1 | tee "$results/gpu_serving_throughput.log"
