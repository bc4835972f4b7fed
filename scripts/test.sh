#!/usr/bin/env bash
# Installs qonnx with its test dependencies and the real-model recipes, prepares the
# real models (cached in models/.cache), and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
if [ -f models/setup.sh ]; then
  bash models/setup.sh
  python -m models.prepare --all
fi
python -m pytest -q
