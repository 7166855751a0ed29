#!/usr/bin/env bash
# Set up (./.venv) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest tests -q "$@"
