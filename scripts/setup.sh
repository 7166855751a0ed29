#!/usr/bin/env bash
# Create ./.venv (if needed) and install monai-icon with its test extras.
# On CPU-only machines torch==2.13.0 is installed first so that no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -c "import monai, torch, monai_icon; print(f'monai-icon {monai_icon.__version__}: torch {torch.__version__}, MONAI {monai.__version__}')"
