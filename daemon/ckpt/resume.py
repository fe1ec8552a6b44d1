"""Resuming: the newest checkpoint that is valid, of this run and loadable, found and loaded, with
what changed since and how many trained steps were lost said in the log."""

from __future__ import annotations

import reprlib
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from daemon import events
from daemon.ckpt.layout import CHECKPOINT_NAME, SHARDED_NAME
from daemon.ckpt.logged_step import LoggedStep
from daemon.ckpt.remote import MANIFEST_SUFFIX, Manifest, RemoteTier, RemoteUnreachable, describe
from daemon.ckpt.schema import CheckpointSchema, InvalidCheckpoint
from daemon.ckpt.sharded import COMMIT_RECORD, ShardedStore
from daemon.ckpt.store import CheckpointStore, Entry
from daemon.config.exactness import exactness_fingerprint, is_resume_safe, with_current_names
from daemon.errors import ConfigError, IncompatibleCheckpoint


class Resumer:
    def __init__(
        self,
        store: CheckpointStore,
        logged: LoggedStep,
        *,
        settings: dict,
        fingerprint: str,
        cpu_threads_setting: int | None,
        world_size: int,
        reshards: bool = False,
        remote: RemoteTier | None = None,
    ) -> None:
        """`settings`: this run's flat settings, as its checkpoints store them under `config`;
        `reshards`: a checkpoint of another world size is resumed (resharded), not refused;
        `remote`: the remote tier, whose committed checkpoints are candidates beside the local ones."""
        self.resumed: Entry | None = None  # once resume() found one
        self.steps_lost: int | None = None  # None: not known (no step was marked, or a fresh start)
        self.store = store
        self.logged = logged
        self.settings = settings
        self.fingerprint = fingerprint
        self.cpu_threads_setting = cpu_threads_setting
        self.world_size = world_size
        self.reshards = reshards
        self.remote = remote
        self.remote_committed: set[str] = set()  # the names the remote tier holds, as the resume found them

    def resume(
        self, schema: CheckpointSchema, load: Callable[[dict], None], position: Callable[[], dict]
    ) -> Entry | None:
        """Load the newest usable checkpoint with `load`; None when there is none (a fresh start)."""
        removed = self.store.remove_temp_files()
        if removed:
            events.TEMP_FILES_REMOVED.emit(files=[p.name for p in removed])
        # The step the run that ended last trained to; read (a bad marker set aside) on a fresh start too.
        trained_to = self.logged.read()

        def validate(entry: Entry) -> None:
            # A config change is the person's to undo (exit 78, the file kept); a file whose content
            # this run cannot load is set aside like a corrupt one. Both before anything is loaded.
            self._check_compatible(entry)
            self._check_world_size(entry)
            schema.check(entry.valid_state)

        candidates = RemoteCheckpoints(self.remote, self.store.directory) if self.remote else None
        if candidates:
            self.remote_committed = {manifest.name for manifest in candidates.manifests}
        entry = self.store.newest_valid(on_invalid=self._report_invalid, validate=validate, remote=candidates)
        if entry is None:
            self._refuse_a_changed_strategy()
            events.FRESH_START.emit(checkpoint_dir=str(self.store.directory))
            return None
        if entry.remote is not None and candidates is not None:
            events.REMOTE_RESUME.emit(
                url=candidates.tier.object_url(entry.remote.name),
                bytes=entry.remote.size,
                ms=round(candidates.download_ms[entry.remote.name], 1),
            )
        self._report_config_changes(entry)
        self._keep_thread_count(entry)
        load(entry.valid_state)
        where = position()
        # The steps the run that ended last trained past this checkpoint (at least: its marker
        # lags its training by up to half a second); none when it saved its last step.
        lost = {"steps_lost": max(0, trained_to - where["global_step"])} if trained_to is not None else {}
        self.logged.mark(where["global_step"])  # from here, this run's steps: never counted twice
        events.RESUMED.emit(path=str(entry.path), kind=entry.kind, **where, **lost)
        trained_by = entry.valid_state.get("world_size", 1)
        if trained_by != self.world_size:  # only where the run reshards (_check_world_size)
            events.RESHARDED.emit(world_size_before=trained_by, world_size=self.world_size, **where)
        self.resumed, self.steps_lost = entry, lost.get("steps_lost")
        return entry

    def _refuse_a_changed_strategy(self) -> None:
        """Each strategy reads only its own format (files for ddp, directories for fsdp): a run whose
        dist.strategy changed would start afresh beside the other's checkpoints, and its retention
        would later delete them. Raises ConfigError when the directory holds the other's and none
        of this run's (none valid: this is asked only when no checkpoint of its own was found)."""
        found = _checkpoints_of_the_other_strategy(self.store.directory, self._sharded)
        if not found:
            return
        this, other = ("fsdp", "ddp") if self._sharded else ("ddp", "fsdp")
        raise ConfigError(
            f"{self.store.directory} holds checkpoints of dist.strategy: {other} ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}) and none of dist.strategy: {this}, which cannot read them: this "
            f"run would start afresh beside them. Set dist.strategy back to {other} to resume them, or point "
            f"checkpoint.dir elsewhere to start afresh."
        )

    @property
    def _sharded(self) -> bool:
        """A run of dist.strategy: fsdp, whose checkpoints are directories."""
        return isinstance(self.store, ShardedStore)

    def _report_invalid(self, entry: Entry, aside: Path | None) -> None:
        events.CHECKPOINT_INVALID.emit(
            path=str(entry.path), reason=entry.reason, moved_to=str(aside) if aside else None
        )

    def _config_changes(self, entry: Entry) -> dict[str, tuple]:
        stored, current = with_current_names(entry.valid_state["config"]), self.settings
        return {
            key: (stored.get(key), current.get(key))
            for key in sorted(stored.keys() | current.keys())
            if stored.get(key) != current.get(key)
        }

    def _check_compatible(self, entry: Entry) -> None:
        changed = self._config_changes(entry)
        breaking = {key: change for key, change in changed.items() if not is_resume_safe(key)}
        if breaking or not self._same_fingerprint(entry):
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in breaking.items())
            raise IncompatibleCheckpoint(
                f"{entry.path} cannot be resumed exactly with this config ({listed or 'fingerprint differs'}). "
                f"Restore those settings, or set checkpoint.dir to an empty directory to start afresh."
            )

    def _same_fingerprint(self, entry: Entry) -> bool:
        """The checkpoint's fingerprint is this run's, or was, before a renamed value got its new name."""
        state = entry.valid_state
        if state["fingerprint"] == self.fingerprint:
            return True
        renamed = with_current_names(state["config"])
        return (
            renamed != state["config"]
            and state["fingerprint"] == exactness_fingerprint(state["config"])
            and exactness_fingerprint(renamed) == self.fingerprint
        )

    def _check_world_size(self, entry: Entry) -> None:
        """A run keeps its world size: each rank's RNGs are saved for its rank, and a batch split over
        another count of ranks sums its gradients in another order. A sharded run reshards instead
        (`reshards`): it continues correctly, not bitwise."""
        trained_with = entry.valid_state.get("world_size", 1)
        if type(trained_with) is not int or trained_with < 1:  # not a count: the file, not the config, is wrong
            raise InvalidCheckpoint(f"world_size: {reprlib.repr(trained_with)} is not a number of ranks")
        if trained_with != self.world_size and not self.reshards:
            reshard = " or set dist.allow_reshard: true to continue (not bitwise)," if self._sharded else ""
            raise IncompatibleCheckpoint(
                f"{entry.path} was trained by {trained_with} rank(s), this run has {self.world_size}: "
                f"it would not resume exactly. Start it with {trained_with} rank(s) (dist.nproc_per_node x "
                f"dist.nnodes),{reshard} or set checkpoint.dir to an empty directory to start afresh."
            )

    def _report_config_changes(self, entry: Entry) -> None:
        changed = self._config_changes(entry)
        if changed:
            events.CONFIG_CHANGED.emit(
                changes={key: {"checkpoint": old, "now": new} for key, (old, new) in changed.items()}
            )

    def _keep_thread_count(self, entry: Entry) -> None:
        """A run keeps its intra-op thread count: sums split over another count round differently."""
        trained_with, now = entry.valid_state.get("cpu_threads"), torch.get_num_threads()
        if trained_with is None or trained_with == now:
            return
        if self.cpu_threads_setting is not None:
            raise IncompatibleCheckpoint(
                f"{entry.path} was trained with {trained_with} CPU threads, train.cpu_threads is {now}: "
                f"a different count rounds differently. Set train.cpu_threads to {trained_with}, or to null "
                f"(the count the run started with), or set checkpoint.dir to an empty directory to start afresh."
            )
        torch.set_num_threads(trained_with)


def _checkpoints_of_the_other_strategy(directory: Path, sharded: bool) -> list[str]:
    """The names of what looks like a checkpoint of the strategy this run is not, newest first: for
    a sharded run, regular files named like a checkpoint; else committed directories (with their
    commit record). Looked at, never read: they are refused whatever they hold."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        try:
            if sharded:
                looks_like = CHECKPOINT_NAME.match(path.name) and stat.S_ISREG(path.lstat().st_mode)
            else:
                looks_like = (
                    SHARDED_NAME.match(path.name)
                    and stat.S_ISDIR(path.lstat().st_mode)
                    and stat.S_ISREG((path / COMMIT_RECORD).lstat().st_mode)
                )
        except FileNotFoundError:  # no commit record; or removed since it was listed
            continue
        if looks_like:
            found.append(path.name)
    return sorted(found, reverse=True)


class RemoteCheckpoints:
    """The remote tier's committed checkpoints as candidates of a resume (daemon/ckpt/store.py): a
    manifest that is not one, and a checkpoint whose bytes or content fail their checks, are
    uncommitted (the manifest set aside) and reported as `checkpoint_invalid`."""

    def __init__(self, tier: RemoteTier, directory: Path) -> None:
        self.tier = tier
        self.directory = directory
        self.download_ms: dict[str, float] = {}
        try:
            self.manifests, bad = tier.committed()
        except Exception as exc:  # noqa: BLE001 -- it answered at start; an outage now ends the start
            raise RemoteUnreachable(f"checkpoint.remote: {tier.url}: cannot list it ({describe(exc)})") from None
        for name, reason in bad:
            self._set_aside(name, reason)

    def fetch(self, manifest: Manifest) -> None:
        try:
            ms = self.tier.download(manifest, self.directory)
        except InvalidCheckpoint:
            raise
        except Exception as exc:  # noqa: BLE001 -- the object is there but the transfer failed
            raise RemoteUnreachable(
                f"checkpoint.remote: cannot download {self.tier.object_url(manifest.name)} ({describe(exc)})"
            ) from None
        self.download_ms[manifest.name] = ms

    def reject(self, manifest: Manifest, reason: str) -> None:
        self._set_aside(manifest.name + MANIFEST_SUFFIX, reason)

    def _set_aside(self, manifest_name: str, reason: str) -> None:
        events.CHECKPOINT_INVALID.emit(
            path=self.tier.object_url(manifest_name), reason=reason, moved_to=self.tier.set_aside(manifest_name)
        )
