"""Install trainer.service and trainer@.service for the venv that runs this script.

    .venv/bin/python systemd/install.py            # as root, from the repository
    .venv/bin/python systemd/install.py --check    # installs nothing: the units' exposure

Checks first that the service's throwaway user can run this venv, and stops with a message
naming the path if it cannot (`systemctl start` would fail with 203/EXEC); it stops too where an
earlier install left an instance's state directory where the units no longer look (its run
would start afresh), with the commands that move it. Then writes to /etc/systemd/system: both
units, with `ExecStart=` pointing at this venv's `trainer`; the shared settings
(systemd/common.conf) as a drop-in for each; where the interpreter, the venv or the code lives
under a directory the units hide (/root and /home with `ProtectHome=yes`, pyenv for one; /tmp
with `PrivateTmp=yes`), a drop-in `paths.conf` that shows just those read-only; and reloads
systemd. Nothing is enabled or started.

`--check` writes the same files to a temporary directory, with the drop-ins already installed
for the units (systemd/cuda.conf, say), and prints the exposure `systemd-analyze security`
gives each unit there: the figure the installed units will have. The repository's unit files
alone rate far worse, since their hardening is the drop-in common.conf.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import daemon

HERE = Path(__file__).resolve().parent
UNITS = ("trainer.service", "trainer@.service")
SYSTEM = Path("etc/systemd/system")  # below the root installed to
SHIPPED_EXEC = "/opt/trainer/.venv/bin/trainer"  # what the unit files name; replaced by this venv's
HIDDEN_HOME = ("/home", "/root", "/run/user")  # ProtectHome=yes
HIDDEN_TMP = ("/tmp", "/var/tmp")  # PrivateTmp=yes
# With DynamicUser=yes, StateDirectory=trainer/X is /var/lib/private/trainer/X (/var/lib/trainer/X
# links to it): trainer.service's is trainer/default, trainer@NAME's trainer/instances/NAME.
STATE = Path("var/lib/private/trainer")
INSTANCES = "instances"
# What --check rates: trainer.service, and trainer@.service as an instance of it.
CHECKED_UNITS = {"trainer.service": "trainer.service", "trainer@NAME.service": "trainer@.service"}


class CannotRun(Exception):
    """The service's user could not run this venv; the message says which path and what to do."""


class StateLeftBehind(Exception):
    """An earlier install's instance state directories, which these units would not use; the
    message has the commands that move them."""


class CannotRate(Exception):
    """--check: systemd-analyze is missing, or could not rate a unit; the message says which."""


def _under(path: Path, roots: tuple[str, ...]) -> bool:
    return any(path == Path(root) or Path(root) in path.parents for root in roots)


def service_paths(prefix: Path, base_prefix: Path, code: Path) -> list[Path]:
    """What the service reads: the interpreter's install, the venv, and the package's code (the
    repository itself for an editable install)."""
    return sorted({base_prefix, base_prefix.resolve(), prefix, code})


def paths_drop_in(paths: list[Path]) -> str:
    """The drop-in that shows `paths` to the service where the units hide them ('' if none is
    hidden); raises CannotRun where the service's user could still not reach one."""
    binds = [p for p in paths if _under(p, HIDDEN_HOME + HIDDEN_TMP)]
    binds = [p for p in binds if not any(other in p.parents for other in binds)]  # outermost only
    for path in paths:
        bound = next((b for b in binds if b == path or b in path.parents), None)
        # A bind mount lands in systemd's own 0755 directories: only the path below it counts.
        start = bound if bound is not None else Path("/")
        for directory in [start, *(p for p in reversed(path.parents) if start in p.parents), path]:
            if directory.stat().st_mode & stat.S_IXOTH == 0:
                raise CannotRun(
                    f"{directory} is not searchable by others, so the service's user cannot reach {path} "
                    f"(systemctl start would fail with 203/EXEC). `chmod o+x {directory}`, or install "
                    f"the venv somewhere others can read (/opt/trainer, as the README does)."
                )
    if not binds:
        return ""
    lines = ["# Written by systemd/install.py: the units hide these, the service needs them (read-only).", "[Service]"]
    if any(_under(p, HIDDEN_HOME) for p in binds):
        lines.append("ProtectHome=tmpfs")  # homes stay hidden, but bind mounts may go inside them
    lines.append("BindReadOnlyPaths=" + " ".join(str(p) for p in binds))
    return "\n".join(lines) + "\n"


def check_no_state_left_behind(root: Path) -> None:
    """Raise StateLeftBehind where instances' state directories are where units before
    trainer/instances/ kept them (trainer/NAME): installed, these units would start their runs
    afresh beside them."""
    state = root / STATE
    if not state.is_dir():
        return
    left = [
        path
        for path in sorted(state.iterdir())
        if path.is_dir()
        and not path.is_symlink()
        and path.name != "default"
        # instances/ is made by systemd as root, or by the commands below as whoever installs; an
        # earlier instance named "instances" had it as its own user
        and not (path.name == INSTANCES and path.stat().st_uid in (0, os.geteuid()))
    ]
    if not left:
        return
    instances = state / INSTANCES
    commands = [f"systemctl stop {' '.join(f'trainer@{path.name}' for path in left)}"]
    moving = {path: path for path in left}
    if instances in moving:  # an earlier instance named "instances": out of the new directory's way first
        moving[instances] = instances.with_name(f"{INSTANCES}.earlier")
        commands.append(f"mv {instances} {moving[instances]}")
    commands.append(f"mkdir -p {instances}")
    for path, source in moving.items():
        commands += [f"mv {source} {instances / path.name}", f"rm -f {root / 'var/lib/trainer' / path.name}"]
    raise StateLeftBehind(
        f"trainer@NAME keeps its state in {root / 'var/lib/trainer' / INSTANCES}/NAME now, so that no instance "
        f"can take trainer.service's; {', '.join(str(path) for path in left)} would be left behind, and their "
        f"runs would start afresh. Move them, run install.py again, then start the instances:\n"
        + "\n".join(f"    {command}" for command in commands)
    )


def install(root: Path, reload: bool) -> list[Path]:
    """Write the units and drop-ins below `root`/etc/systemd/system; the files written."""
    check_no_state_left_behind(root)
    code = Path(daemon.__file__).resolve().parent.parent
    extra = paths_drop_in(service_paths(Path(sys.prefix), Path(sys.base_prefix), code))
    trainer = Path(sys.prefix) / "bin" / "trainer"
    if not trainer.exists():
        raise CannotRun(f"{trainer} not found: install the package into this venv first (pip install .)")
    target = root / SYSTEM
    files = {}
    for unit in UNITS:
        text = (HERE / unit).read_text()
        assert f"ExecStart={SHIPPED_EXEC} " in text, unit
        files[target / unit] = text.replace(SHIPPED_EXEC, str(trainer))
        files[target / f"{unit}.d" / "common.conf"] = (HERE / "common.conf").read_text()
        if extra:
            files[target / f"{unit}.d" / "paths.conf"] = extra
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    if reload:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
    return list(files)


def exposure(root: Path) -> list[str]:
    """Install into a temporary directory, with the drop-ins already below `root` for the units, and
    rate each unit there as `systemd-analyze security` does: one line per unit."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise CannotRate("systemd-analyze not found: it rates the units (Debian: apt-get install systemd)")
    with tempfile.TemporaryDirectory(prefix="trainer-units-") as temporary:
        staged = Path(temporary)
        for unit in UNITS:
            for drop_in in (root / SYSTEM / f"{unit}.d").glob("*.conf"):
                (staged / SYSTEM / f"{unit}.d").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(drop_in, staged / SYSTEM / f"{unit}.d" / drop_in.name)
        install(staged, reload=False)
        lines = []
        for name, unit in CHECKED_UNITS.items():
            rated = subprocess.run(
                [analyze, "security", "--offline=yes", "--no-pager", f"--root={staged}", name],
                capture_output=True, text=True, env={**os.environ, "SYSTEMD_COLORS": "0"},
            )  # fmt: skip
            verdict = re.search(rf"Overall exposure level for {re.escape(name)}: (\S+ \S+)", rated.stdout)
            if verdict is None:
                raise CannotRate(f"systemd-analyze could not rate {name}: {rated.stderr.strip()}")
            drop_ins = ", ".join(sorted(path.name for path in (staged / SYSTEM / f"{unit}.d").glob("*.conf")))
            lines.append(f"{name}: exposure {verdict.group(1)} (drop-ins: {drop_ins})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="install below this directory, without reload")
    parser.add_argument(
        "--check", action="store_true",
        help="install nothing: print the exposure (systemd-analyze security) of the units as installed below --root",
    )  # fmt: skip
    args = parser.parse_args()
    try:
        if args.check:
            print("\n".join(exposure(args.root)))
            return 0
        written = install(args.root, reload=args.root == Path("/"))
    except (CannotRun, StateLeftBehind, CannotRate) as exc:
        print(f"install.py: {'not rated' if args.check else 'not installed'}: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
