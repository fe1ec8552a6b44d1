"""The SLURM batch scripts of examples/slurm/, checked without a cluster (so wherever the suite runs):
bash parses them, sbatch reads every #SBATCH line they hold, and the exit code they requeue on is
daemon/errors.py's. test_slurm_jobs.py runs them on a real cluster."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from daemon.errors import ExitCode

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "slurm"
SCRIPTS = sorted(EXAMPLES.glob("*.sbatch"))


def directives(path: Path) -> list[str]:
    """The #SBATCH options sbatch reads: those before the script's first command (it stops there)."""
    found = []
    for line in path.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            found.append(line.removeprefix("#SBATCH ").strip())
    return found


def test_there_are_examples():
    assert [path.name for path in SCRIPTS] == ["train-2ranks.sbatch", "train.sbatch"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_bash_parses_it(path):
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_every_sbatch_line_is_read_and_asks_for_the_warning_and_the_requeue(path):
    text = path.read_text()
    read = directives(path)
    assert len(read) == text.count("\n#SBATCH "), "an #SBATCH line after the first command is ignored"
    assert "--requeue" in read and "--open-mode=append" in read
    (warning,) = [option for option in read if option.startswith("--signal=")]
    # To the batch shell (B:), which turns it into the stop; ahead of the limit by more than SLURM's 30-s look.
    assert re.fullmatch(r"--signal=B:USR1@(\d+)", warning) and int(warning.rpartition("@")[2]) > 60, warning


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_it_requeues_on_the_stop_exit_code(path):
    (stopped,) = re.findall(r"^STOPPED=(\d+)", path.read_text(), flags=re.MULTILINE)
    assert int(stopped) == ExitCode.STOPPED
