# Sourced by scripts/demo and scripts/test: create .venv (once) and install peftkit into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEFTKIT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
# torch first, pinned to the CPU build: with it installed, the project's torch range pulls nothing else.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import peftkit, torch" || { echo "installation failed" >&2; exit 1; }
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
