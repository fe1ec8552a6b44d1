"""Uploads to the remote tier, on one background thread: the training loop never waits for the network.

Newest first and never queued up: one checkpoint waits at most (the newest saved); a newer save
replaces it (`upload_skipped`), for the remote tier is there to resume from the newest. A failed
upload is retried with backoff (1, 2, 4 ... 30 s) on a new connection (credentials read again),
unless a newer checkpoint replaces it meanwhile. After each commit, retention prunes the remote.
At the end of a run, `finish` waits up to `checkpoint.remote_stop_timeout_seconds` for the newest
checkpoint's upload, and says so (`upload_abandoned`) when it cannot.

The uploader's view (newest committed, pending, last error) is kept in `remote-state.json` in the
run directory for `trainer status`.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from pathlib import Path

from daemon import events
from daemon.ckpt.layout import REMOTE_STATE_FILE, write_atomic
from daemon.ckpt.lease import Lease, LeaseLost
from daemon.ckpt.remote import RemoteTier, describe

MAX_BACKOFF_S = 30.0


class Uploader:
    def __init__(self, tier: RemoteTier, lease: Lease, directory: Path, keep_last: int) -> None:
        self.tier = tier
        self.lease = lease
        self.directory = directory
        self.keep_last = keep_last
        self.protect: set[str] = set()  # the checkpoint this run resumed from: retention keeps it
        self._changed = threading.Condition()
        self._pending: Path | None = None  # the newest checkpoint not yet uploading
        self._current: Path | None = None  # uploading now
        self._closing = False
        self.newest: dict | None = None  # the newest committed by this run: name, committed_at
        self.last_error: dict | None = None  # error, at, name; cleared by a commit
        # A daemon thread: an upload stalled past finish()'s wait does not hold up the exit. Its events
        # carry the run's context (run_id, pid, rank), which lives in contextvars.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._run,), name="ckpt-upload", daemon=True).start()

    def enqueue(self, path: Path) -> None:
        """Upload this local checkpoint next (it is the newest)."""
        with self._changed:
            if self._pending is not None:
                self._skip(self._pending, "a newer checkpoint was saved before its upload began")
            self._pending = path
            self._changed.notify_all()
            self._write_state()

    def _skip(self, path: Path, reason: str) -> None:
        events.UPLOAD_SKIPPED.emit(name=path.name, reason=reason)

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._pending is None and not self._closing:
                    self._changed.wait()
                if self._pending is None:
                    return
                self._current, self._pending = self._pending, None
            try:
                self._upload(self._current)
            finally:
                with self._changed:
                    self._current = None
                    self._changed.notify_all()
                    self._write_state()

    def _upload(self, path: Path) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                self._skip(path, "its file was deleted (local retention) before its upload began")
                return
            started = time.perf_counter()
            events.UPLOAD_STARTED.emit(name=path.name, bytes=size, url=self.tier.object_url(path.name))
            try:
                self.lease.confirm_before_commit()  # never commit once another run holds the prefix
                manifest = self.tier.upload(path, path.name)
            except LeaseLost:
                return  # the loop stops at its next step (Lease.confirm)
            except FileNotFoundError:
                self._skip(path, "its file was deleted (local retention) during its upload")
                return
            except Exception as exc:  # noqa: BLE001 -- network, credentials, throttling: retried
                if self._failed(path, exc, attempt):
                    continue
                return
            if manifest is None:
                self._skip(path, "the remote holds it already")
                return
            ms = (time.perf_counter() - started) * 1e3
            events.UPLOAD_COMPLETED.emit(
                name=path.name,
                bytes=manifest.size,
                ms=round(ms, 1),
                mb_per_s=round(manifest.size / 1e6 / max(ms / 1e3, 1e-6), 1),
                url=self.tier.object_url(path.name),
            )
            with self._changed:
                self.newest = {"name": manifest.name, "committed_at": manifest.committed_at}
                self.last_error = None
                self._write_state()
            try:
                removed = self.tier.prune(self.keep_last, self.protect)
            except Exception:  # noqa: BLE001 -- pruned after the next commit instead
                removed = []
            if removed:
                events.REMOTE_PRUNED.emit(names=removed)
            return

    def _failed(self, path: Path, exc: Exception, attempt: int) -> bool:
        """Report a failed attempt and wait out its backoff; False: give it up for a newer one."""
        delay = min(MAX_BACKOFF_S, 2.0 ** (attempt - 1))
        error = describe(exc)
        events.UPLOAD_FAILED.emit(name=path.name, error=error, attempt=attempt, retry_in_s=delay)
        with self._changed:
            self.last_error = {"error": error, "at": time.time(), "name": path.name}
            self._write_state()
        try:
            self.tier.reconnect()
        except Exception:  # noqa: BLE001 -- the next attempt fails and says why
            pass
        deadline = time.monotonic() + delay
        with self._changed:
            while self._pending is None and not self._closing and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            if self._pending is not None:
                self._skip(path, "a newer checkpoint was saved while its upload failed")
                return False
            return not self._closing  # abandoned: finish() said so

    def finish(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every checkpoint given to be committed (True), then stop."""
        started = time.monotonic()
        with self._changed:
            while self._pending is not None or self._current is not None:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    break
                self._changed.wait(left)
            waiting = self._pending or self._current
            self._closing = True
            self._pending = None
            self._changed.notify_all()
            if waiting is not None:
                events.UPLOAD_ABANDONED.emit(
                    name=waiting.name,
                    reason=self.last_error["error"] if self.last_error else "the upload was still under way",
                    waited_s=round(time.monotonic() - started, 1),
                )
                self._write_state(abandoned=waiting.name)
            return waiting is None

    def _write_state(self, abandoned: str | None = None) -> None:
        """remote-state.json, for `trainer status` (advisory: a failure to write it changes nothing)."""
        waiting = [path.name for path in (self._current, self._pending) if path is not None]
        record = {"url": self.tier.url, "newest": self.newest, "pending": waiting, "last_error": self.last_error}
        if abandoned:
            record["abandoned"] = abandoned
        try:
            write_atomic(
                self.directory, REMOTE_STATE_FILE, lambda file: file.write(json.dumps(record).encode()), durable=False
            )
        except OSError:
            pass
