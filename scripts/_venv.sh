# Sourced by scripts/demo and scripts/test: create .venv (once) and install peftkit into it,
# with the dependency versions tested together (scripts/constraints.txt).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEFTKIT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
fi
pip_install() {
    # keep pip's exit status; drop only its noise about unused local index folders
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/scripts/constraints.txt" "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# torch first, the CPU build: with it installed, the project's torch range pulls no CUDA build.
pip_install "torch==2.13.0"
# llama-cpp-python (the test install's llama.cpp) is built from source the first time: without its
# multimodal library it took 4 min 12 s on 2 cores; pip's wheel cache makes later installs take seconds.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
pip_install -e "$ROOT[dev]"
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
