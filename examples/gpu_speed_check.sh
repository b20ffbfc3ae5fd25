#!/usr/bin/env bash
# The GPU check of docs/studies/speed.md in one command, on a machine with CUDA and this package installed:
#
#     bash examples/gpu_speed_check.sh [OUTPUT_DIR]
#
# It runs the CUDA tests, then the two benchmark commands (WideResNet-50 and EfficientNet-Lite0 PatchCore, random
# weights, a generated dataset, 256 px) at batch 32, 8 and 1 on the GPU, with the per-image synchronisations and
# kernel launches of the refinement. Each part's output is also written to OUTPUT_DIR (default: gpu_speed_check).
set -euo pipefail
out=${1:-gpu_speed_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee "$out/device.txt"
python -m pytest -q -p no:cacheprovider tests/test_robustness.py -k cuda 2>&1 | tee "$out/tests.txt"
python examples/benchmark_speed.py --device gpu --random-weights --backbone wide_resnet50_2 --layers layer2 layer3 \
    --image-sizes 256 --batch-sizes 32 8 1 --refine-backbones model --stages 2>&1 | tee "$out/wide_resnet50_2.txt"
python examples/benchmark_speed.py --device gpu --random-weights --image-sizes 256 --batch-sizes 32 8 1 \
    --refine-backbones model --stages 2>&1 | tee "$out/tf_efficientnet_lite0.txt"
