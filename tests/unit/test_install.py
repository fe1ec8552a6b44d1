"""systemd/install.py's check, on real directories: what the units hide is shown to the service
read-only, and a path the service's user could not reach stops the install with its name."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("install", REPO / "systemd" / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)


def test_paths_the_units_show_need_no_drop_in() -> None:
    assert install.paths_drop_in([Path("/usr"), Path("/usr/lib")]) == ""


def test_an_interpreter_under_a_home_is_bound_read_only() -> None:
    """This venv's interpreter, when it lives under /root or /home (pyenv): the outermost path only."""
    base = Path(sys.base_prefix)
    if not base.is_relative_to("/root") and not base.is_relative_to("/home"):
        pytest.skip(f"the interpreter is not under a home here ({base})")
    text = install.paths_drop_in([base, base / "lib", Path("/usr")])
    assert text.splitlines()[1:] == ["[Service]", "ProtectHome=tmpfs", f"BindReadOnlyPaths={base}"]


def test_a_directory_others_cannot_enter_stops_the_install(tmp_path: Path) -> None:
    """A venv of mode 0700 (under /tmp here, which the units hide and the drop-in would show):
    bound or not, the service's user cannot enter it."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    venv.chmod(0o700)
    with pytest.raises(install.CannotRun, match=f"{venv} is not searchable by others.*203/EXEC"):
        install.paths_drop_in([venv, venv / "bin"])
    venv.chmod(0o755)
    assert f"BindReadOnlyPaths={venv}\n" in install.paths_drop_in([venv, venv / "bin"])


def test_the_script_installs_both_units_with_the_shared_drop_in(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "systemd" / "install.py"), "--root", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    system = tmp_path / "etc" / "systemd" / "system"
    for unit in ("trainer.service", "trainer@.service"):
        assert f"installed {system / unit}\n" in out
        assert f"ExecStart={Path(sys.prefix) / 'bin' / 'trainer'} run --config /etc/trainer/" in (system / unit).read_text()
        assert (system / f"{unit}.d" / "common.conf").read_text() == (REPO / "systemd" / "common.conf").read_text()
