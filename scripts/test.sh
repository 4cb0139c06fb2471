#!/usr/bin/env bash
# The whole test suite, from a clean clone: sets up .venv (with a real llama-server), runs pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup-env.sh"
cd "$ROOT"
exec python -m pytest -q -p no:cacheprovider "$@"
