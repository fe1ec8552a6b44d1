"""Every event the daemon logs, in one place: its name, its level, what it means and its fields.

Each is one JSON object a line off a terminal (journald, `jq`), a short line on one
(daemon/service/logs.py). Every event also carries `timestamp`, `level`, `run_id` and `pid`
(and `rank` in a run of several ranks); those marked "at a position" carry `epoch` (epochs
completed), `step_in_epoch` and `global_step`. docs/events.md is generated from this module
(`python -m daemon.events > docs/events.md`; a test keeps the two equal).

Where each fires, in a run of `trainer run`::

    config refused ................................ config_error (exit 78)
    with several ranks, the launcher:               ranks_started, [signal_received forwarded_to],
                                                    [ranks_restarting], ranks_exited
    assembly ...................................... [dataset_prepared], run_started
    from here, on the writing rank with preemption.notice, on a thread of its own:
        the platform chosen ....................... preemption_watching
        a poll fails (first of a streak) .......... [preemption_poll_failed]
        the first notice .......................... [preemption_notice]; recorded as a request
    resume ........................................ [temp_files_removed], [checkpoint_invalid ...],
                                                    fresh_start | [config_changed] resumed [resharded]
                                                    [advisory_file_invalid], [metrics_lines_dropped],
                                                    [metrics_history_unavailable]
    determinism
    already complete? ............................. training_already_complete (exit 0)
    for each epoch:
        epoch_started
        for each step:
            step boundary:
                stop agreed ....................... signal_received, checkpoint_saved emergency
                                                    (or checkpoint_skipped), stopped (exit 75)
                SIGUSR1 agreed .................... checkpoint_saved on_demand
                preemption notice agreed .......... checkpoint_saved notice (on_notice: checkpoint),
                                                    or as a stop: checkpoint_saved emergency, stopped
                with checkpoint.max_overhead, a periodic save's cost measured
                    and the interval changed ...... save_policy
                periodic save due ................. [checkpoint_snapshot], later checkpoint_saved periodic
                every log.progress_every_seconds .. progress
                cpu_wait switch due ............... cpu_wait_switch, checkpoint_saved handover,
                                                    the process re-executes ([handover_failed])
        evaluation, checkpoint_saved epoch|final, epoch_completed
    training_completed (exit 0)
    with several ranks, each rank at its end ...... agreement_cost
    an error with a documented exit code .......... its event (config_error, checkpoint_write_failed, ...)
    anything else ................................. crashed (exit 1, the traceback as data)

`trainer plot` logs plot_written; `trainer verify`, verify_error or usage_error.

Imports nothing beyond `sys` (not even `typing`, ~4 ms): daemon/errors.py names its events here, and
the entry point imports that before the signal handlers are in place.
"""

from __future__ import annotations

import sys

POSITION = ("epoch", "step_in_epoch", "global_step")


class Event:
    """A named event: `EVENT.emit(field=value, ...)` logs it at its level."""

    __slots__ = ("name", "level", "meaning", "fields", "at_position", "more")

    def __init__(
        self,
        name: str,
        level: str,
        meaning: str,
        fields: tuple[str, ...] = (),
        *,
        at_position: bool = False,
        more: str = "",
    ) -> None:
        """`fields`: those it carries besides the common ones; `more`: fields it carries whose names
        depend on the run (a task's metrics), described."""
        self.name = name
        self.level = level
        self.meaning = meaning
        self.fields = fields
        self.at_position = at_position
        self.more = more

    def emit(self, **fields: object) -> None:
        import structlog  # imported by the logging setup long before any event is emitted

        getattr(structlog.get_logger(), self.level)(self.name, **fields)

    def emit_with_traceback(self, **fields: object) -> None:
        """From an `except` block: the exception's traceback as data, in the event."""
        import structlog

        structlog.get_logger().exception(self.name, **fields)

    def __repr__(self) -> str:
        return f"Event({self.name!r})"


ALL: list[Event] = []


def _event(
    name: str, level: str, meaning: str, fields: tuple[str, ...] = (), *, at_position: bool = False, more: str = ""
) -> Event:
    event = Event(name, level, meaning, fields, at_position=at_position, more=more)
    ALL.append(event)
    return event


# -- a run's life --------------------------------------------------------------------------
RUN_STARTED = _event(
    "run_started",
    "info",
    "The task, data and model are built and the directory is locked (`task`: its entry; `test_samples` when the task has a test_set; `steps_per_epoch` in optimizer steps).",
    ("device", "task", "parameters", "train_samples", "test_samples", "steps_per_epoch", "epochs", "fingerprint"),
)
DATASET_PREPARED = _event(
    "dataset_prepared", "info", "The built-in task laid MNIST out in data.root.", ("root", "files")
)
DETERMINISM = _event(
    "determinism",
    "info",
    "After the resume, before training: what makes this run's results what they are. `cpu_wait` is the setting, `cpu_wait_in_force` auto's choice, `others_cpus` what auto measured at start (null after a handover), `cpu_wait_switching` whether auto follows the machine from here, `environment` the OpenMP/MKL variables in force; the cudnn and cublas fields on CUDA only.",
    (
        "deterministic_algorithms",
        "torch_version",
        "cpu_wait",
        "cpu_wait_in_force",
        "others_cpus",
        "cpu_wait_switching",
        "precision",
        "cpu_threads",
        "interop_threads",
        "cpu_capability",
        "environment",
        "cudnn_deterministic",
        "cudnn_benchmark",
        "cublas_workspace_config",
    ),
)
EPOCH_STARTED = _event(
    "epoch_started",
    "info",
    "An epoch (re)starts; a stop is acted on after a step from here.",
    ("steps_in_epoch",),
    at_position=True,
)
PROGRESS = _event(
    "progress",
    "info",
    "Every log.progress_every_seconds: the epoch in flight's mean loss and rate; with train.cpu_wait auto, the policy in force and `others_cpus`, its last reading.",
    ("steps_in_epoch", "loss", "steps_per_s", "cpu_wait", "others_cpus"),
    at_position=True,
    more="train_<name>: the task's step metrics, averaged over the epoch so far",
)
EPOCH_COMPLETED = _event(
    "epoch_completed",
    "info",
    "An epoch was evaluated and its checkpoint is durable; `epoch` counts the epochs completed, `headline` names the evaluation's first metric (built-in: `test_accuracy`, a fraction).",
    ("train_loss", "headline", "seconds", "steps_per_s"),
    at_position=True,
    more="the task's evaluation metrics (the headline first) and train_<name> step metrics",
)
TRAINING_COMPLETED = _event(
    "training_completed",
    "info",
    "The run is complete (exit 0); `headline` and its value are the last completed epoch's (`headline: null` when train.max_steps ended the run before one).",
    ("headline",),
    at_position=True,
    more="<headline>: the last epoch's headline metric",
)
TRAINING_ALREADY_COMPLETE = _event(
    "training_already_complete",
    "info",
    "Started on a complete run: nothing to do (exit 0).",
    ("epochs", "max_steps"),
    at_position=True,
)

# -- signals and stopping ------------------------------------------------------------------
SIGNAL_RECEIVED = _event(
    "signal_received",
    "info",
    "A stop signal (SIGTERM, SIGINT), logged at the safe point that acts on it; its position is "
    "the last completed step. `during`: `emergency_save`, `completion` (it came during the last "
    "evaluation or final save: the run completes, exit 0) or `handover`; `forwarded_to`: the "
    "launcher sent it on to these ranks.",
    ("signal", "waited_ms", "during", "forwarded_to"),
    at_position=True,
)
STOPPED = _event(
    "stopped",
    "info",
    "Stopped by a signal; the newest checkpoint holds the position (exit 75).",
    ("exit_code",),
    at_position=True,
)
CPU_WAIT_SWITCH = _event(
    "cpu_wait_switch",
    "info",
    "train.cpu_wait auto switches the waiting policy: a handover checkpoint, then the process "
    "re-executes itself (same PID) and logs `resumed` with kind handover.",
    ("from", "to", "others_cpus"),
    at_position=True,
)
PREEMPTION_WATCHING = _event(
    "preemption_watching",
    "info",
    "The preemption watcher polls `platform`'s metadata service at `endpoint` (preemption.notice); "
    "`platform` null: with `auto` none answered as its platform does, and nothing is polled.",
    ("platform", "endpoint"),
)
PREEMPTION_POLL_FAILED = _event(
    "preemption_poll_failed",
    "warning",
    "The metadata service did not answer as documented (unreachable, a timeout, an error status, "
    "garbage); training goes on and polling too. Once per streak of failures.",
    ("platform", "error"),
)
PREEMPTION_NOTICE = _event(
    "preemption_notice",
    "warning",
    "The platform will reclaim this machine (the first notice; logged as it arrives): at the next "
    "step boundary a checkpoint of kind `notice`, training going on; with preemption.on_notice stop, "
    "a stop as on SIGTERM (exit 75). `deadline`: when the machine goes (ISO 8601, UTC; gcp: 30 s "
    "after the notice; null: unknown); `action`: aws's terminate, stop or hibernate, else preempt.",
    ("platform", "deadline", "action"),
)
HANDOVER_FAILED = _event(
    "handover_failed", "error", "The process to hand over to could not be started (exit 75).", ("message", "exit_code")
)

# -- checkpoints ---------------------------------------------------------------------------
CHECKPOINT_SAVED = _event(
    "checkpoint_saved",
    "info",
    "A checkpoint is durable (fsynced, renamed, directory fsynced).",
    ("kind", "path", "bytes", "duration_ms", "checkpoint_global_step"),
    at_position=True,
)
CHECKPOINT_SNAPSHOT = _event(
    "checkpoint_snapshot",
    "debug",
    "A periodic save's snapshot was taken; the loop went on while it is written.",
    ("kind", "stall_ms"),
)
SAVE_POLICY = _event(
    "save_policy",
    "info",
    "checkpoint.max_overhead: the periodic interval changed (`reason`: first, over_budget, rarer_than_needed, "
    "young_daly), chosen from the measurements beside it: `save_ms` what a periodic save costs the loop (its "
    "stall and the slowdown of the steps its write overlaps), `write_ms` the write's own duration, `step_ms` a "
    "step outside saves; `overhead` the share of the training time the saves cost at `interval_steps`; "
    "`young_daly_steps` Young/Daly's interval with checkpoint.mtbf_hours (else null); `expected_loss_steps` "
    "and `expected_loss_s` what a crash makes the run redo on average (half an interval and a write).",
    (
        "interval_steps",
        "interval_s",
        "save_ms",
        "write_ms",
        "step_ms",
        "overhead",
        "max_overhead",
        "young_daly_steps",
        "expected_loss_steps",
        "expected_loss_s",
        "reason",
    ),
    at_position=True,
)
CHECKPOINT_SKIPPED = _event(
    "checkpoint_skipped", "info", "No save: the newest checkpoint holds this very step.", ("reason",), at_position=True
)
CHECKPOINT_INVALID = _event(
    "checkpoint_invalid",
    "warning",
    "A checkpoint failed its checks and was set aside (moved_to) or, not being a regular "
    "file, left in place; the next newest is tried.",
    ("path", "reason", "moved_to"),
)
TEMP_FILES_REMOVED = _event(
    "temp_files_removed", "info", "Temporary files of a killed writer were removed.", ("files",)
)
FRESH_START = _event(
    "fresh_start", "info", "No usable checkpoint: training starts from the beginning.", ("checkpoint_dir",)
)
RESUMED = _event(
    "resumed",
    "info",
    "Resumed from a checkpoint; `steps_lost`: the steps the run that ended last had trained past it, "
    "trained again now (at least that many: the run marks its step at least every 0.5 s; 0 after a stop "
    "that saved its step; absent when unknown).",
    ("path", "kind", "steps_lost"),
    at_position=True,
)
RESHARDED = _event(
    "resharded",
    "warning",
    "A sharded run (dist.strategy: fsdp) resumed a checkpoint of another world size: the model's and the "
    "optimizer's shards resharded, the rest of the epoch in flight split over the new ranks, every rank's RNGs "
    "seeded anew. It continues correctly, not bitwise (docs/distributed.md#another-world-size).",
    ("world_size_before", "world_size"),
    at_position=True,
)
CONFIG_CHANGED = _event("config_changed", "warning", "Resume-safe settings differ from the checkpoint's.", ("changes",))
METRICS_LINES_DROPPED = _event(
    "metrics_lines_dropped",
    "warning",
    "Lines of metrics.jsonl that are not records (torn, too long, not JSON, lacking a field) were dropped.",
    ("path", "lines", "reason"),
)
METRICS_HISTORY_UNAVAILABLE = _event(
    "metrics_history_unavailable",
    "warning",
    "metrics.jsonl cannot be written (at start, or a write failed: a full disk); training goes on without "
    "it, and the run's exit code is its own. Reported once.",
    ("path", "reason"),
)
ADVISORY_FILE_INVALID = _event(
    "advisory_file_invalid",
    "warning",
    "A file of the run directory that only informs (metrics.jsonl, last-logged-step.json, crash-record.json) is unusable: "
    "not a regular file (a directory, a FIFO, a link, never followed), too large, or not what it should "
    "hold. Set aside as <name>.invalid (`moved_to`), or left in place (`moved_to` null, not written "
    "through); the run goes on without what it held.",
    ("path", "reason", "moved_to"),
)
CHECKPOINT_DIR_WRITABLE_BY_OTHERS = _event(
    "checkpoint_dir_writable_by_others",
    "warning",
    "At start: other users can write checkpoint.dir (a group or other write bit, as /tmp; or an owner "
    "other than root and this process's user), so they can plant or replace files there. The trainer "
    "follows no link there, but give the run a directory of its own (mode 0700).",
    ("path", "mode", "owner_uid"),
)
TASK_FILE_WRITABLE_BY_OTHERS = _event(
    "task_file_writable_by_others",
    "warning",
    "As task.entry's file is imported: other users can change it, or a directory above it (a group or "
    "other write bit, but for a directory with the sticky bit, as /tmp; or an owner other than root and "
    "this process's user), and so the code this run executes. One event for each such `path`; keep a "
    "task where only its owner (or root) can write.",
    ("path", "mode", "owner_uid"),
)
RUN_LOCK_LOST = _event(
    "run_lock_lost",
    "error",
    "run.lock was removed or replaced while this run held it: another run may be training in the "
    "directory. The run stops at once without saving (exit 69); `holder_pid`: who holds the new file, if anyone.",
    ("message", "exit_code", "holder_pid"),
)

# -- the remote tier (checkpoint.remote) ---------------------------------------------------
UPLOAD_STARTED = _event(
    "upload_started", "info", "A local checkpoint's upload to the remote tier began.", ("name", "bytes", "url")
)
UPLOAD_COMPLETED = _event(
    "upload_completed",
    "info",
    "A checkpoint and then its manifest are in the remote tier: from here a fresh machine resumes from it.",
    ("name", "bytes", "ms", "mb_per_s", "url"),
)
UPLOAD_FAILED = _event(
    "upload_failed",
    "warning",
    "An upload failed (network, credentials, throttling); training goes on and the upload is retried "
    "after `retry_in_s`, unless a newer checkpoint replaces it.",
    ("name", "error", "attempt", "retry_in_s"),
)
UPLOAD_SKIPPED = _event(
    "upload_skipped",
    "info",
    "A checkpoint is not uploaded: a newer one was saved before its upload began (uploads go newest "
    "first and never queue up), its file is gone, or the remote holds it already.",
    ("name", "reason"),
)
UPLOAD_ABANDONED = _event(
    "upload_abandoned",
    "warning",
    "At the end of a run the newest checkpoint could not be uploaded within "
    "checkpoint.remote_stop_timeout_seconds; the run exits with it durable locally only.",
    ("name", "reason", "waited_s"),
)
REMOTE_RESUME = _event(
    "remote_resume",
    "info",
    "A checkpoint missing from checkpoint.dir was downloaded from the remote tier and matched its manifest.",
    ("url", "bytes", "ms"),
)
REMOTE_PRUNED = _event(
    "remote_pruned",
    "debug",
    "Retention deleted remote checkpoints older than the newest checkpoint.keep_last committed ones.",
    ("names",),
)
LEASE_TAKEN_OVER = _event(
    "lease_taken_over",
    "warning",
    "The remote prefix's lease was held by a run that is gone (its lease expired, or its process on "
    "this host is dead); this run took it over.",
    ("url", "previous_holder", "reason"),
)
LEASE_LOST = _event(
    "lease_lost",
    "error",
    "Another run took over the remote prefix's lease (this run could not renew it in time): the run "
    "stops at once without saving (exit 69).",
    ("message", "exit_code", "holder"),
)

LEASE_NOT_RELEASED = _event(
    "lease_not_released",
    "warning",
    "At the run's end the remote prefix's lease could not be removed within the wait allowed (a slow or "
    "unreachable store): it stays until it lapses, checkpoint.remote_lease_seconds after its last "
    "renewal; a restart on this host takes it over at once.",
    ("url", "reason", "waited_s"),
)

# -- several ranks -------------------------------------------------------------------------
RANKS_STARTED = _event(
    "ranks_started", "info", "The launcher started this node's ranks.", ("pids", "nproc_per_node", "nnodes")
)
RANKS_RESTARTING = _event(
    "ranks_restarting",
    "warning",
    "A rank crashed or was killed: the group restarts.",
    ("remaining_restarts", "max_restarts"),
)
RANKS_EXITED = _event(
    "ranks_exited", "info", "The ranks ended; the launcher exits with the code they make.", ("exit_codes", "exit_code")
)
AGREEMENT_COST = _event(
    "agreement_cost",
    "info",
    "What agreeing on requests cost this rank, per step boundary.",
    ("boundaries", "hand_ms_mean", "read_ms_mean", "step_ms_mean", "share_of_step_percent"),
)

# -- commands ------------------------------------------------------------------------------
PLOT_WRITTEN = _event("plot_written", "info", "`trainer plot` wrote its PNG.", ("path", "runs"))
USAGE_ERROR = _event("usage_error", "error", "A bad command line (exit 2).", ("message",))

# -- errors with a documented exit code (daemon/errors.py) ---------------------------------
ERROR_FIELDS = ("message", "exit_code")
CONFIG_ERROR = _event("config_error", "error", "A bad configuration or task (exit 78).", ERROR_FIELDS)
CHECKPOINT_INCOMPATIBLE = _event(
    "checkpoint_incompatible",
    "error",
    "The newest checkpoint cannot be resumed exactly with this config (exit 78).",
    ERROR_FIELDS,
)
DATASET_UNAVAILABLE = _event(
    "dataset_unavailable", "error", "The dataset is absent and not downloadable (exit 66).", ERROR_FIELDS
)
CHECKPOINT_WRITE_FAILED = _event(
    "checkpoint_write_failed",
    "error",
    "A checkpoint could not be written: disk full, read-only, permissions (exit 73).",
    ERROR_FIELDS,
)
CHECKPOINT_DIR_IN_USE = _event(
    "checkpoint_dir_in_use",
    "error",
    "Another run holds the checkpoint directory (exit 69); `holder_pid` 0: a process outside this PID namespace.",
    (*ERROR_FIELDS, "holder_pid"),
)
REMOTE_IN_USE = _event(
    "remote_in_use",
    "error",
    "Another run holds the lease of checkpoint.remote's prefix (exit 69); `holder`: its host and PID, "
    "`expires_in_s`: when it lapses unless renewed.",
    (*ERROR_FIELDS, "holder", "expires_in_s"),
)
REMOTE_UNREACHABLE = _event(
    "remote_unreachable",
    "error",
    "checkpoint.remote did not answer at start (network, endpoint, credentials): without it the newest "
    "checkpoint is unknown, so the run does not start (exit 69).",
    ERROR_FIELDS,
)
CRASH_LOOP = _event(
    "crash_loop",
    "error",
    "Refused to start after crashes in a row without progress (exit 70); the message names the checkpoint the crashes started from.",
    ERROR_FIELDS,
)
VERIFY_ERROR = _event(
    "verify_error", "error", "A run of `trainer verify` did not behave as planned (exit 1).", ERROR_FIELDS
)
ERROR = _event("error", "error", "An expected failure without an event of its own (exit 1).", ERROR_FIELDS)
CRASHED = _event(
    "crashed", "error", "An unexpected error (exit 1); `exception` holds the traceback as data.", ("exit_code",)
)


def as_markdown() -> str:
    """docs/events.md."""
    lines = [
        "# Events",
        "",
        "Generated from `daemon/events.py` (`python -m daemon.events > docs/events.md`): every event the daemon",
        "logs. Each also carries `timestamp`, `level`, `run_id` and `pid` (and `rank` with several ranks); those",
        "*at a position* carry `epoch` (epochs completed), `step_in_epoch` and `global_step`. Where each fires,",
        "as pseudocode of a run, is in the module's docstring.",
        "",
        "| event | level | meaning | fields |",
        "|---|---|---|---|",
    ]
    for event in ALL:
        fields = ", ".join(f"`{name}`" for name in event.fields)
        extra = "; ".join(part for part in (fields, "at a position" if event.at_position else "", event.more) if part)
        lines.append(f"| `{event.name}` | {event.level} | {event.meaning} | {extra} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(as_markdown())
