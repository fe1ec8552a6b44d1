"""`trainer status`: the operator's one look at a run, from its checkpoint directory alone.

The checkpoints (which one a run resumes from, each verified), the epochs so far, how often and
from what the run was resumed (the metrics history), a preemption notice the run got since it last
resumed (its `notice` checkpoint's history record), the newest checkpoint's age, whether a trainer
holds the directory now, an ETA from the recent rate, and the periodic saves: the config's interval,
or the one checkpoint.max_overhead's budget chose last and what a crash would lose at it.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from daemon.ckpt.history import HistoryReader
from daemon.ckpt.layout import REMOTE_STATE_FILE, SAVE_POLICY_FILE, UnusableFile, read_small_json
from daemon.ckpt.lock import describe, holder
from daemon.ckpt.remote import RemoteTier
from daemon.ckpt.remote import describe as describe_error
from daemon.ckpt.sharded import ShardedStore
from daemon.ckpt.store import CheckpointStore
from daemon.config.sections import Config
from daemon.service.progress import metric_text

RATE_RECORDS = 10  # the ETA's rate: over the newest training records since the last resume
SCAN_TRIES = 5  # listings of a directory whose files a running trainer replaces meanwhile


def report(cfg: Config) -> dict:
    directory = Path(cfg.checkpoint.dir)
    store = (ShardedStore if cfg.dist.strategy == "fsdp" else CheckpointStore)(directory, cfg.checkpoint.keep_last)
    entries, modified = _checkpoints(store)
    running = holder(directory)
    resume = next((entry for entry in entries if entry.valid), None)
    state = resume.state if resume else None
    history = _read_history(directory, {entry["epoch"] for entry in state["history"]} if state else set())
    total = _total_steps(state, cfg) if state else None
    complete = bool(
        state and (state["epoch"] >= cfg.train.epochs or (total is not None and state["global_step"] >= total))
    )
    newest = max((mtime for entry, mtime in zip(entries, modified, strict=True) if entry.valid), default=None)
    return {
        "checkpoint_dir": cfg.checkpoint.dir,
        "run_in_progress": running is not None,
        "run_pid": running or None,
        "checkpoints": [
            {
                "path": str(entry.path),
                "kind": entry.kind,
                "epoch": entry.state["epoch"] if entry.valid else None,
                "step_in_epoch": entry.state["step_in_epoch"] if entry.valid else None,
                "global_step": entry.global_step,
                "bytes": entry.bytes,
                "valid": entry.valid,
                "reason": entry.reason,
            }
            for entry in entries
        ],
        "resume_from": str(resume.path) if resume else None,
        "newest_checkpoint_age_s": round(time.time() - newest, 1) if newest else None,
        "epochs": cfg.train.epochs,
        "global_step": state["global_step"] if state else 0,
        "total_steps": total,
        "complete": complete,
        "history": _epochs(state, history.seconds),
        "resumes": dict(history.resumes),
        "preemption_notice": history.notice,
        "eta_s": None if complete or total is None else _eta(history.recent_training, total),
        "metrics_history_unusable": history.unusable,
        "metrics_lines_dropped": history.dropped,
        "remote": _remote(cfg, directory) if cfg.checkpoint.remote else None,
        "save_policy": _save_policy(cfg, directory),
    }


# What save-policy.json must hold, each a finite number >= 0, for status to show it.
SAVE_POLICY_FIELDS = (
    "interval_steps",
    "interval_s",
    "save_ms",
    "step_ms",
    "overhead",
    "expected_loss_steps",
    "expected_loss_s",
    "global_step",
    "time",
)


def _save_policy(cfg: Config, directory: Path) -> dict:
    """The periodic saves: the config's fixed interval, or the one checkpoint.max_overhead's budget
    chose last, as the run left it in save-policy.json (an advisory file: one that is not what it
    should be is reported, not trusted)."""
    checkpoint = cfg.checkpoint
    found: dict = {"max_overhead": checkpoint.max_overhead, "mtbf_hours": checkpoint.mtbf_hours}
    if checkpoint.max_overhead is None:
        return {**found, "every_steps": checkpoint.every_steps, "every_seconds": checkpoint.every_seconds}
    found.update(chosen=None, unusable=None)
    try:
        record = read_small_json(directory, SAVE_POLICY_FILE)
    except UnusableFile as exc:
        found["unusable"] = str(exc)
        return found
    if record is None:
        return found  # no save measured yet: the run's first periodic save is its measurement
    if not isinstance(record, dict) or not all(_measure(record.get(key)) for key in SAVE_POLICY_FIELDS):
        found["unusable"] = "not a save policy"
        return found
    found["chosen"] = {key: record[key] for key in SAVE_POLICY_FIELDS}
    return found


def _measure(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _remote(cfg: Config, directory: Path) -> dict:
    """The remote tier: its newest committed checkpoint, as the store lists it, and what the run's
    uploader left in remote-state.json (pending uploads, the last error)."""
    assert cfg.checkpoint.remote
    found: dict = {"url": cfg.checkpoint.remote, "newest": None, "newest_age_s": None, "unreachable": None}
    try:
        committed, _ = RemoteTier(cfg.checkpoint.remote, cfg.checkpoint.remote_options).committed()
        if committed:
            found["newest"] = committed[0].name
            found["newest_age_s"] = round(time.time() - committed[0].committed_at, 1)
    except Exception as exc:  # noqa: BLE001 -- status reports what it could not read
        found["unreachable"] = describe_error(exc)
    found.update(pending=[], last_error=None, abandoned=None, uploader_state_unusable=None)
    try:
        state = read_small_json(directory, REMOTE_STATE_FILE)
    except UnusableFile as exc:
        found["uploader_state_unusable"] = str(exc)
        return found
    if isinstance(state, dict):
        pending, error, abandoned = state.get("pending"), state.get("last_error"), state.get("abandoned")
        if isinstance(pending, list) and all(isinstance(name, str) for name in pending):
            found["pending"] = pending
        if isinstance(error, dict) and isinstance(error.get("error"), str):
            found["last_error"] = error["error"]
        if isinstance(abandoned, str):
            found["abandoned"] = abandoned
    elif state is not None:
        found["uploader_state_unusable"] = "not a JSON object"
    return found


@dataclass
class HistorySummary:
    """What status takes from the metrics history, gathered as it streams by."""

    seconds: dict[int, float] = field(default_factory=dict)  # an epoch's seconds, for the epochs asked for
    resumes: Counter[str] = field(default_factory=Counter)  # by the kind of checkpoint resumed from
    recent_training: deque[dict] = field(default_factory=lambda: deque(maxlen=RATE_RECORDS))  # since the last resume
    dropped: int = 0  # lines that are not records (the trainer may be writing the last one)
    unusable: str | None = None  # why the history could not be read at all
    notice: dict | None = None  # the step and time of a notice checkpoint since the last resume


def _read_history(directory: Path, epochs: set[int]) -> HistorySummary:
    summary, reader = HistorySummary(), HistoryReader(directory)
    try:
        for record in reader:
            if record["record"] == "eval" and record["epoch"] in epochs:
                summary.seconds[record["epoch"]] = record["seconds"]
            elif record["record"] == "resume":
                summary.resumes[record["kind"]] += 1
                summary.recent_training.clear()  # the rate of the process training now
                summary.notice = None  # the machine that got it is gone, or the run went on elsewhere
            elif record["record"] == "checkpoint" and record["kind"] == "notice":
                summary.notice = {"global_step": record["global_step"], "time": record["time"]}
            elif record["record"] == "train":
                summary.recent_training.append(record)
    except (UnusableFile, OSError) as exc:  # advisory: status reports it and shows the rest
        summary.unusable = str(exc)
    summary.dropped = reader.dropped
    return summary


def _checkpoints(store: CheckpointStore) -> tuple[list, list[float]]:
    """The checkpoints and their modification times. A file deleted since the listing was pruned by a
    running trainer's retention, not broken: the directory is listed again, since the file that
    replaced it may have been renamed into place after the listing."""
    for _ in range(SCAN_TRIES):
        entries, modified, vanished = [], [], False
        for entry in store.scan():
            try:
                modified.append(entry.path.lstat().st_mtime)  # a link named like a checkpoint: never followed
            except FileNotFoundError:
                vanished = True
                continue
            entries.append(entry)
        if not vanished:
            break
    return entries, modified


def _total_steps(state: dict, cfg: Config) -> int | None:
    """The run's steps in all, from the checkpoint's data shape and the config's epochs and max_steps."""
    data, accum = state["data"], state["config"].get("train.grad_accum_steps") or 1
    per_epoch = math.ceil(math.ceil(data["num_samples"] / data["batch_size"]) / accum)
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def _epochs(state: dict | None, seconds: dict[int, float]) -> list[dict]:
    """Each completed epoch: training loss, headline metric, seconds (from the metrics history)."""
    rows = []
    for entry in state["history"] if state else []:
        headline = next(
            (key for key in entry if key not in ("epoch", "train_loss") and not key.startswith("train_")), None
        )
        rows.append(
            {
                "epoch": entry["epoch"],
                "train_loss": entry["train_loss"],
                "headline": headline,
                "value": entry.get(headline),
                "seconds": seconds.get(entry["epoch"]),
            }
        )
    return rows


def _eta(recent: deque[dict], total: int) -> float | None:
    """Seconds to the end at the rate of the newest training records written by one process."""
    if (
        len(recent) < 2
        or recent[-1]["time"] <= recent[0]["time"]
        or recent[-1]["global_step"] <= recent[0]["global_step"]
    ):
        return None
    rate = (recent[-1]["global_step"] - recent[0]["global_step"]) / (recent[-1]["time"] - recent[0]["time"])
    return round(max(0, total - recent[-1]["global_step"]) / rate, 1)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _seconds(seconds: float) -> str:
    """A duration that may be under a second, as the budget's intervals on a small model are."""
    return f"{seconds:.1f} s" if seconds < 60 else _duration(seconds)


def show(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"checkpoints in {report['checkpoint_dir']}:")
    for row in report["checkpoints"]:
        where = f"epoch {row['epoch']} step {row['step_in_epoch']}" if row["valid"] else f"INVALID: {row['reason']}"
        print(f"  {row['path']}  {row['kind']:<9}  step {row['global_step']:>8}  {row['bytes']:>10} B  {where}")
    if not report["checkpoints"]:
        print("  (none)")
    if report["history"]:
        print("epochs:")
        for row in report["history"][-10:]:  # one screen
            value = f"{row['headline']} {metric_text(row['value'])}" if row["headline"] else ""
            seconds = f"  {row['seconds']:.1f} s" if row["seconds"] is not None else ""
            print(f"  {row['epoch']:>4}  train_loss {metric_text(row['train_loss'])}  {value}{seconds}")
    if report["metrics_history_unusable"]:
        print(f"metrics history not read: {report['metrics_history_unusable']}")
    resumes = report["resumes"]
    kinds = ", ".join(f"{count} from {kind}" for kind, count in sorted(resumes.items()))
    print(f"resumed {sum(resumes.values())} times" + (f" ({kinds})" if kinds else ""))
    notice = report.get("preemption_notice")
    if notice:
        age = _duration(time.time() - notice["time"])
        print(f"preemption notice {age} ago: checkpointed at step {notice['global_step']}; the machine is going away")
    if report["run_in_progress"]:
        print(f"a run holds this directory ({describe(report['run_pid'])})")
    if report["resume_from"]:
        state = "complete" if report["complete"] else f"at step {report['global_step']}/{report['total_steps']}"
        age = _duration(report["newest_checkpoint_age_s"])
        print(f"a run resumes from {report['resume_from']} ({state}; newest checkpoint {age} old)")
        if report["eta_s"] is not None:
            print(f"ETA {_duration(report['eta_s'])} at the recent rate")
    else:
        print("a run starts afresh")
    remote = report.get("remote")
    if remote:
        if remote["unreachable"]:
            print(f"remote {remote['url']}: not reachable ({remote['unreachable']})")
        elif remote["newest"]:
            print(
                f"remote {remote['url']}: newest {remote['newest']}, committed {_duration(remote['newest_age_s'])} ago"
            )
        else:
            print(f"remote {remote['url']}: no committed checkpoint")
        if remote["pending"]:
            print(f"  uploads pending: {', '.join(remote['pending'])}")
        if remote["last_error"]:
            print(f"  last upload error: {remote['last_error']}")
        if remote["abandoned"]:
            print(f"  not uploaded when the last run ended: {remote['abandoned']}")
        if remote["uploader_state_unusable"]:
            print(f"  {REMOTE_STATE_FILE} not read: {remote['uploader_state_unusable']}")
    policy = report.get("save_policy")
    if policy:
        _show_save_policy(policy)


def _show_save_policy(policy: dict) -> None:
    if policy["max_overhead"] is None:
        every = [f"{policy['every_steps']} steps"] if policy["every_steps"] else []
        every += [f"{policy['every_seconds']:g} s"] if policy["every_seconds"] else []
        print(f"periodic saves: every {' or '.join(every)}" if every else "periodic saves: none")
        return
    budget = f"checkpoint.max_overhead {policy['max_overhead']:.1%}"
    if policy["mtbf_hours"]:
        budget += f", mtbf {policy['mtbf_hours']:g} h"
    chosen = policy["chosen"]
    if policy["unusable"]:
        print(f"periodic saves: {budget}; {SAVE_POLICY_FILE} not read: {policy['unusable']}")
    elif chosen is None:
        print(f"periodic saves: {budget}; no save measured yet")
    else:
        print(
            f"periodic saves: every {chosen['interval_steps']} steps (~{_seconds(chosen['interval_s'])}) for {budget}, "
            f"chosen at step {chosen['global_step']} ({_duration(time.time() - chosen['time'])} ago): a save costs "
            f"the loop {chosen['save_ms']:.1f} ms, a step takes {chosen['step_ms']:.1f} ms ({chosen['overhead']:.1%})"
        )
        print(
            f"a crash would redo ~{chosen['expected_loss_steps']:.0f} steps "
            f"(~{_seconds(chosen['expected_loss_s'])}) on average"
        )
