#!/usr/bin/env bash
# One entry point for users and CI: creates or reuses a virtual environment, installs stsr, then runs
#   ./run.sh demo [args]   the main job on the embedded default slide (writes a zarr store and an overlay PNG)
#   ./run.sh test [args]   the whole test suite (pytest args pass through)
set -euo pipefail
cd "$(dirname "$0")"
venv="${STSR_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.stsr-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # Pinned CPU torch first (an unpinned torch pulls a multi-GB CUDA build); an existing torch is kept.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev,analysis,docs]"
  # The benchmarks' TESLA baseline (its test runs with the suite): teslaforst declares the deprecated `sklearn` stub
  # as a dependency, so it goes in without dependencies (the ones it uses are stsr's).
  python -m pip install -q --no-deps teslaforst opencv-python-headless
  touch "$stamp"
fi
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec python -m stsr.cli demo "$@" ;;
  test) exec python -m pytest -q "$@" ;;
  *) echo "usage: ./run.sh demo [--out DIR] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
