"""The code follows the project's flake8 settings (setup.cfg: 120 columns, as MONAI) and its annotations hold
(mypy on the package)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flake8_reports_nothing():
    result = subprocess.run([sys.executable, "-m", "flake8", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"flake8 found problems:\n{result.stdout}{result.stderr}"


def test_mypy_finds_no_type_errors_in_the_package():
    result = subprocess.run([sys.executable, "-m", "mypy", "monai_icon"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
