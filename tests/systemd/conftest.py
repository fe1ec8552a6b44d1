"""Fixtures of the systemd tier: a systemd booted in namespaces (systemd_harness.py), and in one
the trainer's units installed as the README says (trainer_service.py), with their journals."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator

import pytest
from systemd_harness import BootedSystemd, missing_requirements
from trainer_service import INSTALL, SYSTEM, VENV_TRAINER, Journal, Service, drop_in, skip


@pytest.fixture(scope="session")
def bootable() -> None:
    """Skips the test where systemd cannot be booted in namespaces here (not root, no unshare...)."""
    problems = missing_requirements()
    if problems:
        skip("systemd harness unavailable: " + "; ".join(problems))


@pytest.fixture(scope="session")
def systemd_analyze() -> None:
    """Skips the test where `systemd-analyze` cannot check units here."""
    if os.geteuid() != 0 or shutil.which("systemd-analyze") is None:
        skip("systemd-analyze missing or not root")


@pytest.fixture(scope="module")
def systemd(bootable, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedSystemd]:
    """A bare systemd, booted once for the module."""
    with BootedSystemd(tmp_path_factory.mktemp("systemd")) as sd:
        print(f"systemd booted in {sd.boot_seconds:.2f}s as host PID {sd.pid}")
        yield sd


@pytest.fixture(scope="module")
def service(bootable, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A systemd booted once for the module with trainer.service and trainer@.service installed
    by systemd/install.py, a drop-in `test.conf` pointing them at CONFIG_DIR and a test's pace."""
    if not VENV_TRAINER.exists():
        skip(f"{VENV_TRAINER} not found: run the tests with the venv's python, where `trainer` is installed")
    root = tmp_path_factory.mktemp("systemd-contract")
    var_lib = root / "var-lib"
    (var_lib / "trainer-test").mkdir(parents=True)
    for directory in (var_lib, var_lib / "trainer-test"):
        directory.chmod(0o755)  # readable by the service's dynamic user
    with BootedSystemd(root / "systemd") as sd:
        print(f"systemd booted in {sd.boot_seconds:.2f}s as host PID {sd.pid}")
        sd.run("mount", "--bind", str(var_lib), "/var/lib")
        # As the README installs it (with this venv's python), into the container's /etc/systemd.
        installed = sd.run(sys.executable, str(INSTALL), check=False)
        if installed.returncode != 0:
            skip(f"the service could not run this venv: {installed.stderr.strip()}")
        print(installed.stdout, end="")
        sd.write_file(f"{SYSTEM}/trainer.service.d/test.conf", drop_in("config"))
        sd.write_file(f"{SYSTEM}/trainer@.service.d/test.conf", drop_in("%i"))
        print(f"drop-in trainer@.service.d/test.conf:\n{drop_in('%i')}", end="")
        # The units' WantedBy= target, up as on a booted host, so that `systemctl enable` works as
        # deployed. An enabled unit is referenced by it, so systemd keeps the unit's last exit
        # status after it stops instead of garbage-collecting it (an unreferenced unit that went
        # inactive shows ExecMainStatus=0, NRestarts=0 whatever happened).
        sd.write_file(f"{SYSTEM}/multi-user.target", "[Unit]\nDescription=Stand-in multi-user.target\n")
        sd.systemctl("daemon-reload")
        sd.systemctl("start", "multi-user.target")
        yield Service(sd, var_lib)


@pytest.fixture
def follow(service: Service) -> Iterator[Callable[[str], Journal]]:
    """follow(unit) -> a Journal of it, closed after the test."""
    journals: list[Journal] = []

    def make(unit: str) -> Journal:
        journals.append(Journal(service.sd, unit))
        return journals[-1]

    yield make
    for journal in journals:
        journal.close()
