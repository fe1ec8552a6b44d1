"""Boot a real systemd as PID 1 inside fresh Linux namespaces, for tests.

    with BootedSystemd(tmp_path / "systemd") as sd:
        sd.write_file("/etc/systemd/system/x.service", UNIT_TEXT)
        sd.systemctl("daemon-reload")
        sd.systemctl("start", "x.service")
        sd.show("x.service", "ActiveState")      # {"ActiveState": "active"}
        sd.journal("x.service")                  # [{"MESSAGE": ..., ...}, ...]

Isolation model (why each piece exists):

* `unshare` gives systemd its own PID, mount, UTS, IPC, network and cgroup
  namespaces.  The mount namespace starts as a private copy of the host's, so
  host paths (the repo, a venv, pytest's tmp_path under /tmp) stay visible and
  writable at the same paths, while tmpfs mounts hide host state: /run, /dev
  and /etc/systemd (so the host's units, system.conf and journald.conf do not
  leak in, and `systemctl enable/mask/set-property` do not leak out).
* SYSTEMD_UNIT_PATH is restricted to a unit folder made here plus
  /etc/systemd/system:/run/systemd/system, and generators are disabled.  With
  Debian's default unit path, systemd-tmpfiles would empty the HOST's /tmp
  and other units would change host settings.
* /proc/sys is read-only: PID 1 otherwise raises the host-global sysctls
  fs.file-max and fs.nr_open at boot.
* /etc/machine-id is over-mounted with a private id: PID 1 writes the host's
  file when it finds it empty.
* journald runs with Storage=volatile, so logs live only in the private /run.
* The launcher gets its own cgroup v2 directory, which becomes the root of the
  container's cgroup namespace; systemd builds its tree below it.
* /dev/console is a pty drained into `workdir/console.log` together with the
  init script's output: PID 1 logs there before journald runs (and only
  writes to a real tty), which is what explains a failed boot.

Teardown is SIGKILL to the namespace's PID 1 from the host: the kernel then
kills every process in the namespace, and the mount namespace dies with its
last process.  Never `systemctl poweroff/halt/reboot/exit` it.  If the test
process itself dies, a parent-death signal (setpriv, then `unshare
--kill-child`) takes the container down with it; so create BootedSystemd on a
thread that outlives it (pytest's main thread does).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

SYSTEMD = Path("/lib/systemd/systemd")
# This kind of host mounts cgroups in hybrid mode, the v2 tree lives here.
HOST_CGROUP2_CANDIDATES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
BOOT_TARGET = "trainer-harness.target"
# systemd's own units reused unchanged: only the journal.
JOURNALD_UNITS = (
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
# Targets that the default dependencies of services and sockets refer to,
# kept empty so nothing from the host's boot sequence is pulled in.
EMPTY_TARGETS = ("sysinit.target", "basic.target", "sockets.target", "shutdown.target")
# Clean, deterministic environment for commands run inside the container.
INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
}

T = TypeVar("T")


class SystemdHarnessError(RuntimeError):
    pass


def missing_requirements() -> list[str]:
    """Why this host cannot run BootedSystemd; empty if it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not running as root")
    for tool in ("unshare", "nsenter", "setpriv", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` not found")
    if not os.access(SYSTEMD, os.X_OK):
        missing.append(f"{SYSTEMD} not found")
    if _host_cgroup2() is None:
        missing.append("no cgroup v2 hierarchy mounted")
    if not Path("/etc/machine-id").is_file():
        # It gets over-mounted; without it systemd would create it on the host.
        missing.append("/etc/machine-id missing on host")
    return missing


class BootedSystemd:
    """systemd booted as PID 1 in private namespaces; boots in __enter__, dies in __exit__."""

    def __init__(self, workdir: Path, boot_timeout: float = 30.0, name: str = "trainer-harness") -> None:
        self.workdir = Path(workdir)
        self.boot_timeout = boot_timeout
        self.name = name
        self.pid: int = 0  # systemd's PID as seen from the host
        self.boot_seconds: float = 0.0
        self.console_log = self.workdir / "console.log"
        self._launcher: subprocess.Popen[bytes] | None = None
        self.cgroup: Path | None = None  # host path of the container's root cgroup
        self._console_drain: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> BootedSystemd:
        problems = missing_requirements()
        if problems:
            raise SystemdHarnessError("cannot boot systemd: " + "; ".join(problems))
        try:
            self._boot()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._teardown()

    def _boot(self) -> None:
        started = time.monotonic()
        units = self._prepare_workdir()
        cgroup2 = _host_cgroup2()
        assert cgroup2 is not None
        _remove_stale_cgroups(cgroup2, self.name)
        self.cgroup = cgroup2 / f"{self.name}-{uuid.uuid4().hex[:12]}"
        self.cgroup.mkdir()
        env = {
            "PATH": INNER_ENV["PATH"],
            # Tells systemd it is a container's init: it then skips kernel and
            # hardware setup and never remounts file systems.
            "container": self.name,
            "SYSTEMD_UNIT_PATH": f"{units}:/etc/systemd/system:/run/systemd/system",
            "SYSTEMD_GENERATOR_PATH": str(self.workdir / "no-generators"),
            "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": str(self.workdir / "no-generators"),
        }
        # sh joins our cgroup *before* unshare creates the cgroup namespace,
        # so that cgroup becomes the container's root.  setpriv arms a
        # parent-death signal (kept across exec) so unshare dies with us, and
        # --kill-child passes it on to the namespace's PID 1.
        launcher = [
            "sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup),
            "setpriv", "--pdeathsig", "KILL",
            "unshare", "--fork", "--kill-child=SIGKILL", "--pid", "--mount-proc",
            "--mount", "--uts", "--ipc", "--net", "--cgroup", "--propagation", "private",
            "sh", str(self.workdir / "init.sh"),
        ]  # fmt: skip
        master, console = os.openpty()
        env["HARNESS_CONSOLE"] = os.ttyname(console)  # init.sh makes it /dev/console
        try:
            self._launcher = subprocess.Popen(
                launcher,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                start_new_session=True,  # keeps Ctrl-C's SIGINT away from systemd
            )
        finally:
            os.close(console)
        self._console_drain = threading.Thread(target=_drain, args=(master, self.console_log), daemon=True)
        self._console_drain.start()
        self.pid = self._wait_for_pid1()
        self._wait_until_booted()
        self.boot_seconds = time.monotonic() - started

    def _prepare_workdir(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "no-generators").mkdir(exist_ok=True)
        units = self.workdir / "units"
        _write_base_units(units)
        (self.workdir / "machine-id").write_text(uuid.uuid4().hex + "\n")
        init = _INIT_SCRIPT.format(
            machine_id=shlex.quote(str(self.workdir / "machine-id")),
            systemd=shlex.quote(str(SYSTEMD)),
            target=BOOT_TARGET,
        )
        (self.workdir / "init.sh").write_text(init)
        return units

    def _wait_for_pid1(self) -> int:
        launcher = self._launcher
        assert launcher is not None
        systemd = os.path.realpath(SYSTEMD)

        def pid1() -> int | None:
            self._check_launcher_alive()
            pids = _children(launcher.pid)
            # Only once init.sh has exec'd systemd are all private mounts in
            # place; before that, nsenter + systemctl could reach the host's
            # /run/systemd/private.
            return pids[0] if pids and _exe(pids[0]) == systemd else None

        return self.wait_for(pid1, timeout=10, interval=0.005, what="init.sh to exec systemd")

    def _wait_until_booted(self) -> None:
        def booted() -> str | None:
            self._check_launcher_alive()
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            return state if state in ("running", "degraded") else None

        try:
            state = self.wait_for(booted, timeout=self.boot_timeout, interval=0.02, what="systemd to boot")
        except TimeoutError as e:
            raise SystemdHarnessError(f"{e}\n{self.diagnostics()}") from None
        if state == "degraded":
            failed = self.systemctl("list-units", "--failed", "--no-legend", check=False).stdout
            raise SystemdHarnessError(f"systemd booted degraded, failed units:\n{failed}\n{self.diagnostics()}")

    def _check_launcher_alive(self) -> None:
        if self._launcher is not None and self._launcher.poll() is not None:
            time.sleep(0.1)  # let the drain thread catch the last words
            raise SystemdHarnessError(
                f"systemd container exited early (status {self._launcher.returncode})\n{self.diagnostics()}"
            )

    def diagnostics(self) -> str:
        """Tail of the console (init script + PID 1 output) and, if alive, of the journal."""
        text = self.console_log.read_text(errors="replace") if self.console_log.exists() else ""
        parts = [f"--- console ({self.console_log}) ---\n{text[-6000:]}"]
        if self.pid and self._launcher is not None and self._launcher.poll() is None:
            journal = self.run("journalctl", "--no-pager", "-n", "60", check=False, timeout=10)
            parts.append(f"--- journal ---\n{journal.stdout}{journal.stderr}")
        return "\n".join(parts)

    def _teardown(self) -> None:
        launcher = self._launcher
        if launcher is not None:
            if launcher.poll() is None:
                if self.pid:
                    self._save_journal()
                # Kill the namespace's PID 1 (the kernel kills the rest) and let
                # unshare reap it; killing unshare first would leave PID 1 a
                # zombie for the host's init.  Only if nothing was forked yet,
                # kill unshare itself (--kill-child covers a racing fork).
                targets = [self.pid] if self.pid else _children(launcher.pid)
                for pid in targets or [launcher.pid]:
                    _kill(pid)
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise SystemdHarnessError(f"systemd container (PID {self.pid}) did not die") from None
            self._launcher = None
        if self._console_drain is not None:
            self._console_drain.join(timeout=5)  # ends once every pty user is gone
            self._console_drain = None
        if self.cgroup is not None:
            _remove_cgroup_tree(self.cgroup)
            self.cgroup = None

    def _save_journal(self) -> None:
        """The journal dies with the container: keep it in workdir for post-mortems."""
        try:
            out = self.run("journalctl", "--no-pager", "-o", "short-precise", check=False, timeout=10).stdout
            (self.workdir / "journal.txt").write_text(out)
        except (OSError, subprocess.SubprocessError):
            pass

    # -- driving it --------------------------------------------------------

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in all of the container's namespaces (its cgroup stays the host's)."""
        if not self.pid:
            raise SystemdHarnessError("systemd is not running")
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *cmd],
            env=INNER_ENV,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SystemdHarnessError(
                f"{shlex.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file as the container sees it, e.g. into its private /etc/systemd/system."""
        if not path.startswith("/"):
            raise ValueError(f"path must be absolute: {path!r}")
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1"'
        self.run("sh", "-c", script, "sh", path, f"{mode:o}", input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` as a dict; all properties when none are named."""
        out = self.systemctl("show", *(f"--property={p}" for p in props), "--", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> list[dict[str, Any]]:
        """Journal entries of `unit`, oldest first.  They arrive asynchronously: poll with wait_for."""
        out = self.run("journalctl", "--no-pager", "-o", "json", "-u", unit).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for(self, predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "") -> T:
        """Poll until `predicate()` is truthy and return that value; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                name = what or getattr(predicate, "__name__", repr(predicate))
                raise TimeoutError(f"timed out after {timeout}s waiting for {name}; last value: {value!r}")
            time.sleep(interval)


def verify_unit(path: Path | str) -> list[str]:
    """Lint a unit file with `systemd-analyze verify`; returns its complaints, [] when clean.

    `verify` exits 0 on most mistakes (unknown keys, unparsable values), so
    the caller must fail on any returned line.  The unit is checked in the
    same unit universe BootedSystemd boots with (a copy of the unit plus the
    stand-in targets, nothing from the host): with the host's unit path,
    `verify` builds a start transaction through the host's sysinit.target and
    reports problems of unrelated host units.  Consequences: `Requires=` on a
    unit outside that universe is reported (Wants=/After= are not), and
    every executable the unit names must exist (`Command ... is not
    executable`).  Nonexistent User=/WorkingDirectory= are not checked.
    The unit's drop-ins (`<path>.d/*.conf` beside it) are checked with it.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="verify-unit-") as tmp:
        _write_base_units(Path(tmp))
        copy = Path(tmp) / path.name
        copy.unlink(missing_ok=True)  # may be a symlink into /lib/systemd/system: never write through it
        shutil.copyfile(path, copy)
        drop_ins = path.parent / f"{path.name}.d"
        if drop_ins.is_dir():
            shutil.copytree(drop_ins, Path(tmp) / drop_ins.name)
        proc = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", "--generators=no", str(copy)],
            env={**INNER_ENV, "SYSTEMD_UNIT_PATH": tmp, "SYSTEMD_LOG_COLOR": "0"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0 and not lines:
        lines.append(f"systemd-analyze verify exited {proc.returncode}")
    return lines


def _host_cgroup2() -> Path | None:
    for path in HOST_CGROUP2_CANDIDATES:
        if (path / "cgroup.procs").exists() and (path / "cgroup.subtree_control").exists():
            return path
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _write_base_units(units: Path) -> None:
    """The container's whole unit universe besides /etc/systemd/system and /run/systemd/system."""
    units.mkdir(parents=True, exist_ok=True)
    for target in EMPTY_TARGETS:
        (units / target).write_text(f"[Unit]\nDescription=Harness stand-in for {target}\n")
    wants = " ".join(JOURNALD_UNITS)
    (units / BOOT_TARGET).write_text(f"[Unit]\nDescription=Test harness boot target\nWants={wants}\nAfter={wants}\n")
    for unit in JOURNALD_UNITS:
        if not (units / unit).is_symlink():
            (units / unit).symlink_to(Path("/lib/systemd/system") / unit)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _drain(master: int, log: Path) -> None:
    """Copy the console pty into `log` until the last process holding it is gone.

    It must be read continuously: PID 1 blocks once a pty's buffer is full.
    """
    try:
        with open(log, "ab", buffering=0) as out:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: no slave left open
                    return
                if not data:
                    return
                out.write(data.replace(b"\r", b""))  # systemd resets the tty to "\r\n" endings
    finally:
        os.close(master)


def _remove_stale_cgroups(root: Path, name: str, min_age: float = 300.0) -> None:
    """Remove empty cgroups that killed test runs left behind (their containers died by PDEATHSIG).

    The age check spares the cgroup of a concurrent run that is just starting.
    """
    for cgroup in root.glob(f"{name}-*"):
        try:
            empty = "populated 0" in (cgroup / "cgroup.events").read_text()
            if empty and time.time() - cgroup.stat().st_mtime > min_age:
                _remove_cgroup_tree(cgroup, timeout=1.0)
        except OSError:
            pass  # raced with its owner or another cleanup: not ours to insist on


def _remove_cgroup_tree(cgroup: Path, timeout: float = 10.0) -> None:
    """rmdir a cgroup and the sub-cgroups systemd made, deepest first.

    rmdir fails with EBUSY until killed tasks are fully released, so retry.
    """
    deadline = time.monotonic() + timeout
    while cgroup.exists():
        subdirs = sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        try:
            for d in [*subdirs, cgroup]:
                d.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# PID 1 of the new PID namespace runs this in the new mount namespace, then
# becomes systemd.  Everything mounted here is private to the container.
_INIT_SCRIPT = """\
set -eu
# Refuse to touch mounts unless we really are a fresh namespace's init.
[ "$$" = 1 ] || {{ echo "init.sh must run as PID 1 of a new namespace" >&2; exit 1; }}
# Private /run first, because mount(8) records mounts in /run/mount/utab;
# -n keeps this first one from creating /run/mount on the host.
mount -n -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
# Stage the console pty (a node of the host's devpts) before /dev is replaced.
touch /run/console
mount --bind "$HARNESS_CONSOLE" /run/console
# Own sysfs (read-only, as container managers do) and cgroup2 view; in the
# new cgroup namespace the launcher's cgroup appears as "/".
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
# PID 1 would raise host-global sysctls (fs.file-max, fs.nr_open) at boot.
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
if [ -e /proc/sysrq-trigger ]; then
    mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
    mount -o remount,bind,ro /proc/sysrq-trigger
fi
# Private id: systemd writes /etc/machine-id when it finds it empty.
mount --bind {machine_id} /etc/machine-id
# Hide all host systemd configuration (see module docstring).
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /etc/systemd
mkdir /etc/systemd/system
mkdir -p /run/systemd/journald.conf.d
printf '%s\\n' '[Journal]' Storage=volatile RateLimitIntervalSec=0 \\
    ForwardToSyslog=no ForwardToWall=no ForwardToConsole=no \\
    > /run/systemd/journald.conf.d/zz-trainer-harness.conf
# Minimal /dev: fresh device nodes, a private devpts, and the pty as console.
mount -t tmpfs -o mode=755,nosuid tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
mknod -m 666 /dev/tty c 5 0
touch /dev/console
mount --move /run/console /dev/console
rm /run/console
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
unset HARNESS_CONSOLE
exec {systemd} --unit={target}
"""
