"""The remote tier: checkpoints in object storage, so that a run resumes on a machine whose
`checkpoint.dir` is empty (a preempted cloud VM's restart lands on another machine).

`checkpoint.remote` is any fsspec URL (s3://bucket/prefix is the one tested; gs://, az:// and
file:// go through the same code). Under it:

    ckpt-<step>-<kind>.pt                  a checkpoint, byte for byte the local file
    ckpt-<step>-<kind>.pt.manifest.json    its commit record: name, size, SHA-256; written last
    ckpt-...pt.manifest.json.invalid       a manifest whose checkpoint failed its checks, set aside
    lease.json                             which run trains into this prefix, until when (daemon/ckpt/lease.py)

A checkpoint is committed in two steps: the object is put whole (a put that fails or is killed
leaves no object or an old one, never one a manifest names), its size is read back, then the
manifest is created, where the store supports it only if none exists. A resume trusts only a
manifested object whose bytes hash to the manifest's: an object without one (an upload killed
between the two steps), a truncated or altered one, or a manifest that is not ours, is never used.

Nothing here is imported unless checkpoint.remote is set: fsspec and the store's package
(`pip install -e '.[s3]'`) are an optional extra.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from daemon import events
from daemon.ckpt.layout import CHECKPOINT_NAME, write_atomic
from daemon.ckpt.schema import InvalidCheckpoint
from daemon.errors import CheckpointWriteError, ConfigError, ExitCode, TrainerError

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = 1
MANIFEST_LIMIT = 1 << 16  # bytes read of a manifest: a real one is ~200
CHUNK = 8 << 20  # bytes hashed or downloaded at a time
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Every request is bounded, so that a stalled connection fails (and is retried) instead of hanging an
# upload for ever; botocore's own retries are kept few, the uploader retries with its own backoff.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}}
}
START_TRIES = 4  # attempts to reach the remote at start, 2 s apart, before giving up (exit 69)


class RemoteUnreachable(TrainerError):
    exit_code = ExitCode.IN_USE
    event = events.REMOTE_UNREACHABLE


@dataclass(frozen=True)
class Manifest:
    """A committed checkpoint of the remote tier, as its manifest describes it."""

    name: str
    size: int  # bytes
    sha256: str
    committed_at: float

    @property
    def global_step(self) -> int:
        match = CHECKPOINT_NAME.match(self.name)
        assert match
        return int(match["step"])

    @property
    def kind(self) -> str:
        match = CHECKPOINT_NAME.match(self.name)
        assert match
        return match["kind"]

    def as_json(self) -> bytes:
        record = {"format": MANIFEST_FORMAT, "name": self.name, "bytes": self.size, "sha256": self.sha256}
        return json.dumps({**record, "committed_at": self.committed_at}).encode()


def parse_manifest(data: bytes, manifest_name: str) -> Manifest:
    """A manifest's content checked against its own name; raises InvalidCheckpoint."""
    if len(data) > MANIFEST_LIMIT:
        raise InvalidCheckpoint(f"manifest larger than {MANIFEST_LIMIT} bytes")
    try:
        record = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidCheckpoint(f"manifest is not JSON ({type(exc).__name__})") from None
    name = manifest_name.removesuffix(MANIFEST_SUFFIX)
    valid = (
        isinstance(record, dict)
        and record.get("format") == MANIFEST_FORMAT
        and record.get("name") == name
        and type(record.get("bytes")) is int
        and record["bytes"] >= 0
        and isinstance(record.get("sha256"), str)
        and SHA256.match(record["sha256"]) is not None
        and type(record.get("committed_at")) in (int, float)
    )
    if not valid:
        raise InvalidCheckpoint("manifest does not describe this checkpoint (format, name, bytes, sha256)")
    return Manifest(name, record["bytes"], record["sha256"], float(record["committed_at"]))


def file_sha256(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(CHUNK):
        digest.update(chunk)  # releases the GIL for large buffers: the loop trains on meanwhile
    return digest.hexdigest()


class RemoteTier:
    """The checkpoints under `checkpoint.remote`: committed, listed, downloaded, set aside, pruned."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.options = options
        self.fs, self.root = self._connect()
        # S3 refuses a put whose body falls short of its Content-Length, and botocore sends a checksum
        # of the body that the server verifies: a put that succeeded stored every byte. Other stores'
        # objects have their size read back before the manifest names them.
        self._put_is_whole = any(protocol in ("s3", "s3a") for protocol in _protocols(self.fs))
        # Every name with a manifest when the prefix was last listed, and those this run committed
        # since; None before a listing. Under the lease nobody else commits, so only these names
        # need a look for an earlier commit before an upload.
        self._manifested: set[str] | None = None

    def _connect(self) -> tuple[Any, str]:
        try:
            import fsspec
        except ImportError:
            raise ConfigError(
                "checkpoint.remote needs fsspec and the store's package: pip install -e '.[s3]' (S3), "
                "gcsfs (gs://) or adlfs (az://)"
            ) from None
        protocol = self.url.partition("://")[0]
        defaults = S3_DEFAULTS if protocol in ("s3", "s3a") else {}
        merged = {**defaults, **self.options}
        if "config_kwargs" in defaults and "config_kwargs" in self.options:
            merged["config_kwargs"] = {**defaults["config_kwargs"], **self.options["config_kwargs"]}
        try:
            # A fresh instance each time: fsspec's cache would hand back one whose credentials expired.
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **merged)
        except (ValueError, TypeError, ImportError) as exc:
            raise ConfigError(f"checkpoint.remote: {self.url}: {exc}") from None
        return fs, root.rstrip("/")

    def reconnect(self) -> None:
        """A new filesystem, which reads credentials from the standard chain again (after a failure:
        a role's temporary credentials may have expired)."""
        self.fs, self.root = self._connect()

    def object_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    # -- at start ---------------------------------------------------------------------------

    def check_usable(self) -> None:
        """Before training: the bucket exists (else 78, naming the key) and answers (else 69, after
        a few tries). Whether it may be written is found by taking the lease (73)."""
        local = "file" in _protocols(self.fs)
        for attempt in range(START_TRIES):
            try:
                if local:
                    self.fs.makedirs(self.root, exist_ok=True)
                    return
                bucket = self.root.split("/", 1)[0]
                try:
                    self.fs.info(bucket)  # `exists` says False for a store that does not answer too
                except FileNotFoundError:
                    raise ConfigError(
                        f"checkpoint.remote: {self.url}: the bucket {bucket!r} does not exist (or is not "
                        f"visible with these credentials); create it or fix the URL"
                    ) from None
                self.fs.invalidate_cache()
                return
            except PermissionError as exc:
                raise CheckpointWriteError(f"checkpoint.remote: {self.url}: no permission ({exc})") from None
            except TrainerError:
                raise
            except Exception as exc:  # noqa: BLE001 -- network and credential errors of any filesystem
                if attempt + 1 == START_TRIES:
                    raise RemoteUnreachable(
                        f"checkpoint.remote: {self.url} did not answer ({describe(exc)}); the newest "
                        f"checkpoint may be there, so the run does not start without it. Check the "
                        f"network (under systemd: the drop-in systemd/network.conf), "
                        f"checkpoint.remote_options.endpoint_url and the credentials"
                    ) from None
                time.sleep(2)

    # -- committed checkpoints --------------------------------------------------------------

    def committed(self) -> tuple[list[Manifest], list[tuple[str, str]]]:
        """The committed checkpoints, newest first, and each manifest that is not one: (name, why)."""
        names = self.names()
        found, bad = [], []
        for name in names:
            if not name.endswith(MANIFEST_SUFFIX) or not CHECKPOINT_NAME.match(name.removesuffix(MANIFEST_SUFFIX)):
                continue
            try:
                data = self.fs.cat_file(self._path(name), start=0, end=MANIFEST_LIMIT + 1)
                found.append(parse_manifest(data, name))
            except InvalidCheckpoint as exc:
                bad.append((name, str(exc)))
            except FileNotFoundError:  # pruned meanwhile by the run that holds the lease
                continue
        found.sort(key=lambda m: (m.global_step, m.kind in ("epoch", "final"), m.committed_at), reverse=True)
        self._manifested = {m.name for m in found} | {name.removesuffix(MANIFEST_SUFFIX) for name, _ in bad}
        return found, bad

    def names(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.root)
            return [path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:  # an empty prefix
            return []

    def upload(self, path: Path, name: str) -> Manifest | None:
        """Commit the local checkpoint `path` as `name`: the object (its size read back where the
        store's put does not guarantee it), then its manifest (create-only). None: `name` is
        committed already with these bytes. Called only while this run holds the prefix's lease."""
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            file.seek(0)
            # Hashed while the requests go out (hashlib releases the GIL): the file never changes once
            # written, and bytes that did would fail the manifest's check, never pass it.
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") as hashing:
                sha256_of_file = hashing.submit(file_sha256, file)
                may_exist = self._manifested is None or name in self._manifested
                existing = self._manifest(name) if may_exist else None
                if existing is None:
                    self.fs.put_file(str(path), self._path(name))
                sha256 = sha256_of_file.result()
        if existing is not None:
            if existing.sha256 == sha256:
                return None
            # Another run's commit under this name: replacing its object would break its manifest.
            raise FileExistsError(f"{self.object_url(name)} is committed with other bytes")
        manifest = Manifest(name, size, sha256, time.time())
        if not self._put_is_whole:
            stored = self.fs.info(self._path(name))["size"]
            if stored != size:  # a store that dropped buffered data says so here, not at resume
                raise OSError(f"{self.object_url(name)} holds {stored} bytes after the upload, not {size}")
        self.create(name + MANIFEST_SUFFIX, manifest.as_json())
        if self._manifested is not None:
            self._manifested.add(name)
        return manifest

    def _manifest(self, name: str) -> Manifest | None:
        try:
            data = self.fs.cat_file(self._path(name + MANIFEST_SUFFIX), start=0, end=MANIFEST_LIMIT + 1)
        except FileNotFoundError:
            return None
        try:
            return parse_manifest(data, name + MANIFEST_SUFFIX)
        except InvalidCheckpoint:
            return None

    def create(self, name: str, data: bytes) -> None:
        """Write a small object only if none exists (S3's If-None-Match; a plain write elsewhere)."""
        try:
            self.fs.pipe_file(self._path(name), data, mode="create")
        except TypeError:  # a filesystem without create-only writes
            if self.fs.exists(self._path(name)):
                raise FileExistsError(self.object_url(name)) from None
            self.fs.pipe_file(self._path(name), data)

    def read_small(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name), start=0, end=MANIFEST_LIMIT + 1)
        except FileNotFoundError:
            return None

    def write_small(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def download(self, manifest: Manifest, directory: Path) -> float:
        """Put the committed checkpoint into `directory` under its name, atomically and durably, if its
        bytes match the manifest (else raise InvalidCheckpoint, nothing left behind). Returns ms."""
        started = time.perf_counter()

        def fetch(file: BinaryIO) -> None:
            digest, size = hashlib.sha256(), 0
            with self.fs.open(self._path(manifest.name), "rb", block_size=CHUNK, cache_type="none") as remote:
                while chunk := remote.read(CHUNK):
                    size += len(chunk)
                    if size > manifest.size:
                        raise InvalidCheckpoint(f"longer than the {manifest.size} bytes its manifest names")
                    digest.update(chunk)
                    file.write(chunk)
            if size != manifest.size:
                raise InvalidCheckpoint(f"{size} bytes, its manifest names {manifest.size}")
            if digest.hexdigest() != manifest.sha256:
                raise InvalidCheckpoint("its SHA-256 is not its manifest's")

        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(directory, manifest.name, fetch, durable=True)
        except FileNotFoundError:
            raise InvalidCheckpoint("manifest without its object") from None
        return (time.perf_counter() - started) * 1e3

    def set_aside(self, manifest_name: str) -> str | None:
        """Uncommit a checkpoint found wrong: its manifest renamed `.invalid` (the object is left for
        inspection until retention removes it). Returns where it went, None if it could not be moved."""
        try:
            self.fs.mv(self._path(manifest_name), self._path(manifest_name + ".invalid"))
        except Exception:  # noqa: BLE001 -- reported by the caller; the resume goes on to the next
            return None
        return self.object_url(manifest_name + ".invalid")

    def prune(self, keep_last: int, protect: set[str]) -> list[str]:
        """Delete committed checkpoints older than the newest `keep_last`, except `protect` (the one
        this run resumed from), manifest first (no manifest ever names a missing object); and objects
        without a manifest older than the newest committed one (uploads killed midway)."""
        committed, _ = self.committed()
        if not committed:
            return []
        kept = {m.name for m in committed[:keep_last]} | protect
        removed = []
        for manifest in committed[keep_last:]:
            if manifest.name in kept:
                continue
            self.remove(manifest.name + MANIFEST_SUFFIX)
            self.remove(manifest.name)
            removed.append(manifest.name)
        newest_step = committed[0].global_step
        manifested = {m.name for m in committed}
        for name in self.names():
            match = CHECKPOINT_NAME.match(name)
            if match and name not in manifested and name not in kept and int(match["step"]) < newest_step:
                self.remove(name)
                removed.append(name)
        return removed


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def describe(exc: BaseException) -> str:
    """An error of the remote filesystem in one line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
