"""The code as pyproject.toml configures its checks: ruff's lint and format, and mypy's types. Run by
the test suite, so the README's test command (and CI) checks them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = {
    "ruff lint": [sys.executable, "-m", "ruff", "check", "daemon", "tests", "bench", "systemd"],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "daemon", "tests", "bench", "systemd"],
    "mypy": [sys.executable, "-m", "mypy"],  # files and settings: pyproject.toml
}


@pytest.mark.parametrize("check", CHECKS)
def test_the_code_passes(check):
    done = subprocess.run(CHECKS[check], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"{check} failed:\n{done.stdout}{done.stderr}"
