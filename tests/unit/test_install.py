"""systemd/install.py's check, on real directories: what the units hide is shown to the service
read-only, and a path the service's user could not reach stops the install with its name."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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
        assert (
            f"ExecStart={Path(sys.prefix) / 'bin' / 'trainer'} run --config /etc/trainer/"
            in (system / unit).read_text()
        )
        assert (system / f"{unit}.d" / "common.conf").read_text() == (REPO / "systemd" / "common.conf").read_text()


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "systemd" / "install.py"), *args], capture_output=True, text=True)


def exposure_of(text: str, unit: str) -> float:
    """The figure in systemd-analyze's "Overall exposure level for UNIT: 0.3 SAFE" or --check's
    "UNIT: exposure 0.3 SAFE"."""
    [level] = re.findall(rf"{re.escape(unit)}: (?:exposure )?(\d+\.\d+) ", text)
    return float(level)


def test_check_prints_the_exposure_of_the_units_as_installed(tmp_path: Path) -> None:
    """The repository's unit file alone rates UNSAFE (its hardening is the drop-in common.conf);
    `--check` gives the installed units' figure, the operator's drop-ins counted, and installs nothing."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not found")
    analyze = ["systemd-analyze", "security", "--offline=yes", "--no-pager"]
    alone = subprocess.run([*analyze, str(REPO / "systemd" / "trainer.service")], capture_output=True, text=True).stdout
    assert exposure_of(alone, "trainer.service") > 9

    checked = run_install("--check", "--root", str(tmp_path / "bare"))
    assert checked.returncode == 0, checked.stderr
    print(checked.stdout, end="")
    assert [line.split(":")[0] for line in checked.stdout.splitlines()] == ["trainer.service", "trainer@NAME.service"]
    assert not (tmp_path / "bare").exists()
    installed = tmp_path / "installed"
    run_install("--root", str(installed)).check_returncode()
    for unit in ("trainer.service", "trainer@NAME.service"):
        rated = subprocess.run([*analyze, f"--root={installed}", unit], capture_output=True, text=True).stdout
        assert exposure_of(checked.stdout, unit) == exposure_of(rated, unit) <= 0.5

    # With the GPU and network drop-ins the README installs for trainer.service.
    drop_ins = tmp_path / "with-drop-ins" / "etc" / "systemd" / "system" / "trainer.service.d"
    drop_ins.mkdir(parents=True)
    for name in ("cuda.conf", "network.conf"):
        shutil.copyfile(REPO / "systemd" / name, drop_ins / name)
    checked = run_install("--check", "--root", str(tmp_path / "with-drop-ins"))
    assert checked.returncode == 0, checked.stderr
    print(checked.stdout, end="")
    assert "cuda.conf, network.conf" in checked.stdout.splitlines()[0]
    assert 0.5 < exposure_of(checked.stdout, "trainer.service") <= 2.5
    assert exposure_of(checked.stdout, "trainer@NAME.service") <= 0.5
    assert sorted(path.name for path in drop_ins.parent.rglob("*") if path.is_file()) == ["cuda.conf", "network.conf"]


def test_instance_state_where_an_earlier_install_kept_it_stops_the_install(tmp_path: Path) -> None:
    """Instances kept their state in /var/lib/trainer/NAME before /var/lib/trainer/instances/NAME:
    installed over them, the units would start those runs afresh. The install stops and says how to
    move them; run as it says, the commands move the checkpoints where the instances find them.
    As root, an earlier instance named "instances" too (its directory its dynamic user's)."""
    private = tmp_path / "var" / "lib" / "private" / "trainer"
    links = tmp_path / "var" / "lib" / "trainer"
    earlier = ["alice", "instances"] if os.geteuid() == 0 else ["alice"]
    for state in ("default", *earlier):
        (private / state / "checkpoints").mkdir(parents=True)
        (private / state / "checkpoints" / "ckpt-0000000010-periodic.pt").write_text(state)
        links.mkdir(exist_ok=True)
        (links / state).symlink_to(f"../private/trainer/{state}")
    if "instances" in earlier:
        os.chown(private / "instances", 61234, 61234)

    refused = run_install("--root", str(tmp_path))

    assert refused.returncode == 1 and not (tmp_path / "etc").exists(), refused
    message, *commands = refused.stderr.splitlines()
    print(refused.stderr)
    assert message.startswith("install.py: not installed: trainer@NAME keeps its state in ")
    assert all(str(private / state) in message for state in earlier)
    assert str(private / "default") not in refused.stderr  # trainer.service's stays where it is
    assert commands[0].split() == ["systemctl", "stop", *(f"trainer@{state}" for state in earlier)]
    subprocess.run(["sh", "-ec", "\n".join(commands[1:])], check=True)
    for state in earlier:
        assert (private / "instances" / state / "checkpoints" / "ckpt-0000000010-periodic.pt").read_text() == state
        assert not (links / state).is_symlink()
    assert (private / "default" / "checkpoints" / "ckpt-0000000010-periodic.pt").read_text() == "default"
    assert run_install("--root", str(tmp_path)).returncode == 0


def test_the_directories_the_units_hide_are_named_alike_here_and_in_the_daemon() -> None:
    """install.py shows them to the service where the venv lives there; a task file there is a
    config error that says so (daemon/train/task.py)."""
    from daemon.train.task import HIDDEN_FROM_THE_SERVICE

    assert set(install.HIDDEN_HOME + install.HIDDEN_TMP) == set(HIDDEN_FROM_THE_SERVICE)
    common = (REPO / "systemd" / "common.conf").read_text().splitlines()
    assert {f"{setting}yes" for setting in HIDDEN_FROM_THE_SERVICE.values()} <= set(common)
