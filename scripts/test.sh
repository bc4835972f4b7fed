#!/usr/bin/env bash
# The test command: installs qonnx with its test dependencies and the real-model
# recipes, prepares the real models (cached in models/.cache), runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q -e ".[test,qat]"
bash models/setup.sh -q
python -m models.prepare --all
ruff check qonnx tests models scripts bench
python -m pytest -q
