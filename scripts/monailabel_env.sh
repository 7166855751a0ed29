#!/usr/bin/env bash
# Create MONAI Label's own virtual environment (./.venv-monailabel, or $VENV_ML) with monai-icon in it.
# MONAI Label 0.8.5 needs numpy<2 and these pins, or its server crashes at start; it must not share the
# project's main environment. Prints the Python to use as MONAILABEL_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV_ML=${VENV_ML:-.venv-monailabel}
if [ ! -x "$VENV_ML/bin/monailabel" ]; then
  "$PYTHON" -m venv "$VENV_ML"
  "$VENV_ML/bin/python" -m pip install -q --upgrade pip
  "$VENV_ML/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV_ML/bin/python" -m pip install -q "monailabel==0.8.5" "torchvision==0.28.0" "numpy<2" "pydicom<3" "pynetdicom<3" "dicomweb-client[gcp]<0.60"
fi
# MONAI Label imports torchvision at start; PyPI's torchvision is built against PyPI's (CUDA) torch of the same
# version and fails to load with a CPU-only torch build ("operator torchvision::nms does not exist"): use PyPI's.
if ! "$VENV_ML/bin/python" -c "import torchvision.utils" 2>/dev/null; then
  # --isolated: straight from PyPI, past any local CPU-only wheel cache configured for pip on this machine
  "$VENV_ML/bin/python" -m pip --isolated install -q ${PIP_CERT:+--cert "$PIP_CERT"} --force-reinstall "torch==2.13.0" "torchvision==0.28.0" "numpy<2"
fi
"$VENV_ML/bin/python" -m pip install -q -e . "numpy<2"
echo "MONAILABEL_PYTHON=$(cd "$VENV_ML/bin" && pwd)/python"
