# Sourced by the scripts: use the active virtualenv, or create and activate ./.venv.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
