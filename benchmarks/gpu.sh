#!/usr/bin/env bash
# The GPU benchmark, one command on one H100 (under 8 minutes): a TinyLlama-1.1B-shaped pair
# (22 layers; the default and `matching: learned` for 50 steps) and a Llama-2-7B-shaped pair
# (32 layers, 4096 / 11008, 32 / 32 heads) with the default; time against the floor, peak GPU
# and host memory. Pairs are random-init, built on the GPU in seconds.
#   bash benchmarks/gpu.sh            -> benchmarks/results/scale-cuda-tinyllama.json,
#                                        benchmarks/results/scale-cuda-llama7b.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d)}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" benchmarks/scale.py --device cuda --shape tinyllama --layers 22 --repeats 1 --learned 50 \
    --no-cached --no-solve --work "$WORK"
"$PY" benchmarks/scale.py --device cuda --shape llama7b --layers 32 --repeats 1 \
    --no-cached --no-solve --work "$WORK"
