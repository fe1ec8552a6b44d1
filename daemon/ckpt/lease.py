"""One run per remote prefix: the lease, an object `lease.json` under `checkpoint.remote`.

Two machines training into one prefix would commit over each other and prune each other's
checkpoints; the run directory's lock (daemon/ckpt/lock.py) cannot see another machine. The lease
is created only if none exists (S3's conditional write), names its holder (host, PID, a token of
this run) and the time it lapses, and is renewed by a thread of its own every third of
`checkpoint.remote_lease_seconds`. A run that finds another's lease exits 69 naming the holder,
unless the holder is gone: its lease lapsed, or it was a process of this host that is no longer
alive (a SIGKILLed run restarted by systemd takes over at once), or it is this very process
before a handover re-executed it. A takeover is logged (`lease_taken_over`).

A holder that could not renew in time may find its lease taken over: its renewal thread sees
another token, and the run stops at the next step (`lease_lost`, exit 69). Every upload confirms
the lease before it commits, so a run that lost its lease never commits again: by reading the
token back, unless this run wrote the lease less than half its lapse ago (no other run takes over
a lease before it lapses, and the half leaves room for clocks that disagree). The window left:
two runs taking over one lapsed lease at the same moment both delete and create; the later
create fails for one of them, or, if both creates land in turn, the first holder's next renewal
or upload finds the other's token and stops.
"""

from __future__ import annotations

import contextvars
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from daemon import events
from daemon.ckpt.remote import RemoteTier, RemoteUnreachable, describe
from daemon.errors import CheckpointWriteError, DirectoryInUse

LEASE_OBJECT = "lease.json"
RELEASE_WAIT_S = 5.0


class RemoteInUse(DirectoryInUse):
    event = events.REMOTE_IN_USE


class LeaseLost(DirectoryInUse):
    event = events.LEASE_LOST


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    token: str
    expires_at: float

    def describe(self) -> str:
        return f"{self.host} PID {self.pid}"


def parse_holder(data: bytes | None) -> Holder | None:
    """The lease's holder; None for a lease that is not one (garbage: taken over as lapsed)."""
    if data is None:
        return None
    try:
        record = json.loads(data)
        holder = Holder(record["host"], record["pid"], record["token"], float(record["expires_at"]))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not (isinstance(holder.host, str) and type(holder.pid) is int and isinstance(holder.token, str)):
        return None
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class Lease:
    def __init__(self, tier: RemoteTier, seconds: float) -> None:
        self.tier = tier
        self.seconds = seconds
        self.token = secrets.token_hex(8)
        self.host = socket.gethostname()
        self.lost: str | None = None  # who holds it now, once another run took it over
        self._stop = threading.Event()
        self._written_at = -float("inf")  # time.monotonic() of this run's last write of the lease

    def _record(self) -> bytes:
        holder = {"host": self.host, "pid": os.getpid(), "token": self.token}
        return json.dumps({**holder, "expires_at": time.time() + self.seconds}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise RemoteInUse (69) naming its live holder; CheckpointWriteError (73)
        when the prefix cannot be written; RemoteUnreachable (69) when the store does not answer."""
        for _ in range(3):  # a lease removed or taken over between two requests: look again
            try:
                written_at = time.monotonic()
                self.tier.create(LEASE_OBJECT, self._record())
                self._written_at = written_at
                break
            except FileExistsError:
                data = self.tier.read_small(LEASE_OBJECT)
            except PermissionError as exc:
                raise CheckpointWriteError(
                    f"checkpoint.remote: {self.tier.url}: no permission to write ({exc})"
                ) from None
            except Exception as exc:  # noqa: BLE001 -- network and credential errors of any filesystem
                raise RemoteUnreachable(f"checkpoint.remote: {self.tier.url}: {describe(exc)}") from None
            if data is None:
                continue
            holder = parse_holder(data)
            reason = self._gone(holder)
            if reason is None:
                assert holder is not None
                raise RemoteInUse(
                    f"another run trains into {self.tier.url} ({holder.describe()}); stop it, or point "
                    f"checkpoint.remote elsewhere. Its lease lapses {max(0.0, holder.expires_at - time.time()):.0f} s "
                    f"after its last renewal",
                    holder=holder.describe(),
                    expires_in_s=round(holder.expires_at - time.time(), 1),
                )
            self.tier.remove(LEASE_OBJECT)
            events.LEASE_TAKEN_OVER.emit(
                url=self.tier.object_url(LEASE_OBJECT),
                previous_holder=holder.describe() if holder else None,
                reason=reason,
            )
        else:
            raise RemoteInUse(f"the lease of {self.tier.url} kept changing hands; another run is starting there")
        # Its events carry the run's context (run_id, pid, rank), which lives in contextvars.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._renew,), name="ckpt-lease", daemon=True).start()

    def _gone(self, holder: Holder | None) -> str | None:
        """Why the holder of a lease found no longer holds it; None: it does."""
        if holder is None:
            return "the lease object is not a lease"
        if holder.host == self.host:
            if holder.pid == os.getpid():
                return "this process, before it re-executed"
            if not _alive(holder.pid):
                return "its process on this host is gone"
        if holder.expires_at < time.time():
            return "it lapsed"
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.confirm_remote()
                written_at = time.monotonic()
                self.tier.write_small(LEASE_OBJECT, self._record())
                self._written_at = written_at
            except LeaseLost:
                return
            except Exception:  # noqa: BLE001 -- retried at the next renewal; the uploads report the outage
                continue

    def confirm_remote(self) -> None:
        """Raise LeaseLost unless the lease object still holds this run's token (one small read)."""
        if self.lost is None:
            holder = parse_holder(self.tier.read_small(LEASE_OBJECT))
            if holder is not None and holder.token == self.token:
                return
            self.lost = holder.describe() if holder else "nobody (the lease was removed)"
        raise LeaseLost(f"another run took over the lease of {self.tier.url}: {self.lost}", holder=self.lost)

    def confirm_before_commit(self) -> None:
        """Raise LeaseLost unless this run still holds the lease: known from its own recent write, or
        read back (see the module's docstring)."""
        if self.lost is None and time.monotonic() - self._written_at < self.seconds / 2:
            return
        self.confirm_remote()

    def confirm(self) -> None:
        """At each step boundary: raise LeaseLost once the renewals found the lease taken over."""
        if self.lost is not None:
            raise LeaseLost(f"another run took over the lease of {self.tier.url}: {self.lost}", holder=self.lost)

    def release(self) -> None:
        """Remove the lease if it is still this run's, waiting at most RELEASE_WAIT_S for the store
        (a stalled one must not hold up an exit): unreleased, it lapses after remote_lease_seconds."""
        self._stop.set()
        if self.lost is None:
            started = time.monotonic()
            outcome: list[str] = []  # what the remover found: "" once done, else the error
            remover = threading.Thread(
                target=self._remove_if_held, args=(outcome,), name="ckpt-lease-release", daemon=True
            )
            remover.start()
            remover.join(RELEASE_WAIT_S)
            if outcome != [""]:
                events.LEASE_NOT_RELEASED.emit(
                    url=self.tier.object_url(LEASE_OBJECT),
                    reason=outcome[0] if outcome else f"no answer within {RELEASE_WAIT_S:g} s",
                    waited_s=round(time.monotonic() - started, 1),
                )

    def _remove_if_held(self, outcome: list[str]) -> None:
        try:
            holder = parse_holder(self.tier.read_small(LEASE_OBJECT))
            if holder is not None and holder.token == self.token:
                self.tier.remove(LEASE_OBJECT)
            outcome.append("")
        except Exception as exc:  # noqa: BLE001 -- reported by release()
            outcome.append(describe(exc))
