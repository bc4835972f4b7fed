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
lint-imports          # the layer contracts (pyproject.toml [tool.importlinter])
mypy                  # qonnx/ (pyproject.toml [tool.mypy])
if [ -f ../shared/tools/arch_check.py ]; then  # the layout rules, where shared/ sits beside the checkout (CI)
  python ../shared/tools/arch_check.py
fi
python -m pytest -q
