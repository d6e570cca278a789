#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs this project with the given extras.
# Usage: bash scripts/venv.sh [EXTRA[,EXTRA...]]     e.g.  bash scripts/venv.sh test
# Set PYTHON=/path/to/python3.12 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  # pyenv installs that are not the active version (their shims refuse to run)
  for c in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.1[2-9]*/bin/python3; do
    if [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

py=$(find_python) || { echo "error: Python >= 3.12 not found (jax >= 0.11 needs it); set PYTHON=" >&2; exit 1; }
echo "using $py ($("$py" --version))"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  rm -rf .venv
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -c 'import jax; print("jax", jax.__version__, "backend", jax.default_backend())'
