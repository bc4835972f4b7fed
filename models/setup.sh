#!/usr/bin/env bash
# Install what the model recipes need into the *current* Python environment.
# Usage (from the repo root, inside the venv): bash models/setup.sh [pip flags, e.g. -q]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
"$python" -m pip install "$@" -r "$here/requirements.txt"
"$python" -m pip install "$@" --no-deps -r "$here/requirements-nodeps.txt"
