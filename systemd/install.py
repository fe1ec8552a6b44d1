"""Install trainer.service and trainer@.service for the venv that runs this script.

    .venv/bin/python systemd/install.py            # as root, from the repository

Checks first that the service's throwaway user can run this venv, and stops with a message
naming the path if it cannot (`systemctl start` would fail with 203/EXEC). Then writes to
/etc/systemd/system: both units, with `ExecStart=` pointing at this venv's `trainer`; the
shared settings (systemd/common.conf) as a drop-in for each; where the interpreter, the venv
or the code lives under a directory the units hide (/root and /home with `ProtectHome=yes`, pyenv
for one; /tmp with `PrivateTmp=yes`), a drop-in `paths.conf` that shows just those read-only;
and reloads systemd. Nothing is enabled or started.
"""

from __future__ import annotations

import argparse
import stat
import subprocess
import sys
from pathlib import Path

import daemon

HERE = Path(__file__).resolve().parent
UNITS = ("trainer.service", "trainer@.service")
SHIPPED_EXEC = "/opt/trainer/.venv/bin/trainer"  # what the unit files name; replaced by this venv's
HIDDEN_HOME = ("/home", "/root", "/run/user")  # ProtectHome=yes
HIDDEN_TMP = ("/tmp", "/var/tmp")  # PrivateTmp=yes


class CannotRun(Exception):
    """The service's user could not run this venv; the message says which path and what to do."""


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


def install(root: Path, reload: bool) -> list[Path]:
    """Write the units and drop-ins below `root`/etc/systemd/system; the files written."""
    code = Path(daemon.__file__).resolve().parent.parent
    extra = paths_drop_in(service_paths(Path(sys.prefix), Path(sys.base_prefix), code))
    trainer = Path(sys.prefix) / "bin" / "trainer"
    if not trainer.exists():
        raise CannotRun(f"{trainer} not found: install the package into this venv first (pip install .)")
    target = root / "etc" / "systemd" / "system"
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="install below this directory, without reload")
    args = parser.parse_args()
    try:
        written = install(args.root, reload=args.root == Path("/"))
    except CannotRun as exc:
        print(f"install.py: not installed: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
