"""Checkpoints that pass the CRC but are not what they claim: forged from real checkpoints at test
time, each is set aside with `checkpoint_invalid` and its reason, and the previous one is used."""

from __future__ import annotations

import copy
import io
import json
import random
from pathlib import Path

import pytest
import structlog
import torch

from daemon.ckpt import lock
from daemon.errors import ExitCode, IncompatibleCheckpoint
from daemon.train.loop import Trainer
from trainer_proc import (
    RunConfig,
    TrainerProcess,
    assert_same_training,
    final_checkpoint,
    in_process_trainer,
    run_to_end,
)


def _set(path: tuple, value):
    def forge(state: dict) -> None:
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value

    return forge


# name: (forgery applied to a real checkpoint's content, what the reason must say)
FORGERIES = {
    "transposed weight": (_set(("state_dict", "0.weight"), lambda w: w.t().contiguous()), "state_dict.0.weight: shape"),
    "rng with only its version": (_set(("rng",), {"version": 1}), "rng: keys missing"),
    "optimizer without param groups": (_set(("optimizer", "param_groups"), []), "optimizer.param_groups: 0 entries"),
    "epoch as a word": (_set(("epoch",), "one"), "epoch: int expected, found 'one'"),
    "truncated data order": (_set(("data", "order"), lambda o: o[:-1]), "data.order: shape"),
    "step far beyond the epoch": (_set(("step_in_epoch",), 10**6), "step_in_epoch: 1000000 is outside"),
    "weights as float64": (
        _set(("state_dict", "0.bias"), lambda b: b.double()),
        "state_dict.0.bias: dtype torch.float64",
    ),
    "parameter missing": (lambda s: s["state_dict"].pop("0.bias"), "state_dict: keys missing: 0.bias"),
    "unknown top-level key": (_set(("payload",), 1), "unexpected keys: payload"),
    "optimizer state of another shape": (
        _set(("optimizer", "state", 0, "exp_avg"), lambda t: t[:1]),
        "optimizer.state.0.exp_avg: shape",
    ),
    "optimizer state for a parameter the model lacks": (
        _set(("optimizer", "state", 99), {}),
        "state for parameters this model lacks: [99]",
    ),
    "optimizer state missing after training": (lambda s: s["optimizer"]["state"].pop(1), "no state for parameters [1]"),
    "forged betas": (_set(("optimizer", "param_groups", 0, "betas"), (2.0, 0.999)), "param_groups[0].betas"),
    "infinite learning rate": (
        _set(("optimizer", "param_groups", 0, "lr"), float("inf")),
        "inf is not a finite number",
    ),
    "scheduler missing": (_set(("scheduler",), None), "scheduler: a mapping expected"),
    "scheduler an epoch behind": (_set(("scheduler", "last_epoch"), 0), "scheduler.last_epoch: 0, expected 1"),
    "samples that do not add up": (_set(("metrics", "samples"), 7), "metrics.samples: 7"),
    "history too short": (_set(("history",), []), "history: must list"),
    "negative loss": (_set(("metrics", "loss_sum"), -1.0), "metrics.loss_sum: is negative"),
    "order with a repeated sample": (
        _set(("data", "order"), lambda o: torch.cat([o[:1], o[:-1]])),
        "not a permutation",
    ),
    "order of another epoch": (_set(("data", "epoch"), 7), "data.epoch: 7"),
    "order for another batch size": (_set(("data", "batch_size"), 50), "data.batch_size: 50"),
    "invalid torch generator state": (_set(("rng", "torch"), lambda t: torch.full_like(t, 255)), "rng.torch:"),
    "numpy position out of range": (_set(("rng", "numpy", "pos"), 10**6), "rng.numpy.pos"),
    "python state out of range": (_set(("rng", "python", "state"), lambda t: t * 2**33), "rng.python.state"),
    "gauss_next a string": (_set(("rng", "python", "gauss_next"), "x"), "rng.python.gauss_next"),
    "cuda states not a list": (_set(("rng", "cuda"), 3), "rng.cuda: a list expected"),
    "a bool for an int": (_set(("rng", "numpy", "has_gauss"), True), "rng.numpy.has_gauss: int expected"),
    "no CPU threads": (_set(("cpu_threads",), 0), "cpu_threads: 0 is not a count >= 1"),
    "no ranks": (_set(("world_size",), 0), "world_size: 0 is not a number of ranks"),
}
# The cases of the report that crashed every start or silently skipped an epoch's rest.
REPORTED = [
    "transposed weight",
    "rng with only its version",
    "optimizer without param groups",
    "epoch as a word",
    "truncated data order",
    "step far beyond the epoch",
]


def forge(path: Path, forgery) -> None:
    """Rewrite the checkpoint at `path` with forged content: a valid archive, every CRC right."""
    state = torch.load(path, weights_only=True)
    forgery(state)
    torch.save(state, path)


def test_forged_checkpoints_are_set_aside_and_the_run_resumes_exactly(run_config, reference_runs):
    """The real CLI, resuming past the reported forgeries and past directories named like checkpoints."""
    run_config.settings = {"checkpoint.every_steps": 5, "train.epochs": 1}
    run_to_end(run_config)
    directory = run_config.checkpoint_dir
    forged = sorted(directory.glob("ckpt-*.pt"), reverse=True)[: len(REPORTED)]  # steps 40 (final) down to 15
    for path, name in zip(forged, REPORTED, strict=False):
        forge(path, FORGERIES[name][0])
    newest, oldest = directory / "ckpt-0000000045-periodic.pt", directory / "ckpt-0000000001-periodic.pt"
    newest.mkdir()
    oldest.mkdir()  # reached by retention once keep_last is 2
    run_config.settings["checkpoint.keep_last"] = 2

    rerun = run_to_end(run_config)

    reported = [(event["path"], event["reason"], event["moved_to"]) for event in rerun.events("checkpoint_invalid")]
    assert reported[0] == (f"checkpoints/{newest.name}", "not a regular file; left in place", None)
    for (path, reason, moved_to), file, name in zip(reported[1:], forged, REPORTED, strict=False):
        assert path == f"checkpoints/{file.name}" and moved_to == path + ".invalid", reported
        assert FORGERIES[name][1] in reason, (name, reason)
    assert len(reported) == 1 + len(REPORTED)
    (resumed,) = rerun.events("resumed")
    assert resumed["global_step"] == 10
    assert newest.is_dir() and oldest.is_dir()
    assert sorted(p.name for p in directory.glob("ckpt-*.pt") if p.is_file()) == [
        "ckpt-0000000035-periodic.pt",
        "ckpt-0000000040-final.pt",
    ]
    assert_same_training(final_checkpoint(directory), reference_runs(**{"train.epochs": 1}))


def test_status_reports_a_directory_named_like_a_checkpoint(run_config):
    run_config.checkpoint_dir.mkdir()
    (run_config.checkpoint_dir / "ckpt-0000000001-periodic.pt").mkdir()

    status = TrainerProcess.start(run_config, "--json", command="status")

    assert status.wait() == 0, status.output()
    (row,) = json.loads(status.output())["checkpoints"]
    assert (row["valid"], row["reason"]) == (False, "not a regular file; left in place")


# -- in process: the loader itself, fed a corpus of forgeries and random mutations ----------------

FUZZ_SETTINGS = {
    "data.train_subset": 400,
    "data.test_subset": 100,
    "model.hidden": [8],
    "optim.scheduler": {"name": "step", "step_size": 1, "gamma": 0.5},
    "train.epochs": 2,
    "checkpoint.every_steps": 1,
    "checkpoint.async_save": False,
}
STEPS_PER_EPOCH = 4
TARGET, FALLBACK = 6, 5  # epoch 1 step 2, with one epoch of history and a stepped scheduler


class InProcessRun:
    """A Trainer in this process, and the checkpoints of one uninterrupted run of it."""

    def __init__(self, config: RunConfig) -> None:
        config.settings = {**FUZZ_SETTINGS, "checkpoint.dir": str(config.checkpoint_dir)}
        self.directory = config.checkpoint_dir
        self.trainer = in_process_trainer(config)
        with structlog.testing.capture_logs():
            assert self.trainer.run().exit_code == ExitCode.COMPLETE
        self.files = {int(p.name[5:15]): (p.name, p.read_bytes()) for p in self.directory.glob("ckpt-*.pt")}
        self.reference = final_checkpoint(self.directory)

    def train_to_end(self) -> ExitCode:
        """Run the trainer again. A run releases its lock as it ends: take the directory again, on
        the lock object the trainer's parts share."""
        run_lock = self.trainer.parts.run_lock
        assert run_lock is not None
        run_lock.fd = lock.acquire(self.directory).fd
        with structlog.testing.capture_logs():
            return self.trainer.run().exit_code

    def resume_from(self, forged: bytes) -> tuple[list[dict], Exception | None]:
        """A directory of the fallback checkpoint and `forged` as the target; resume from it."""
        for path in self.directory.glob("ckpt-*"):
            path.unlink()
        for step, data in ((FALLBACK, self.files[FALLBACK][1]), (TARGET, forged)):
            (self.directory / self.files[step][0]).write_bytes(data)
        with structlog.testing.capture_logs() as events:
            try:
                self.trainer.manager.resume()
            except IncompatibleCheckpoint as exc:
                return events, exc
        return events, None

    @property
    def target(self) -> Path:
        return self.directory / self.files[TARGET][0]

    def target_content(self) -> dict:
        return torch.load(io.BytesIO(self.files[TARGET][1]), weights_only=True)


@pytest.fixture(scope="module")
def in_process(mnist_root, tmp_path_factory):
    """On one intra-op thread: the hundreds of short runs below are tiny tensors, where a team of
    threads only spins at its barriers (on a busy machine, most of their time). The thread count is
    recorded in each checkpoint like any other; every run here, the reference too, uses this one.
    The session's count is restored after (a used mutation may also have changed it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield InProcessRun(RunConfig(workdir=tmp_path_factory.mktemp("in-process"), data_root=mnist_root))
    finally:
        torch.set_num_threads(threads)


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def loaded_state(trainer: Trainer) -> dict:
    """What the trainer's objects hold now, under the keys of the checkpoint format."""
    state = trainer.manager.state_dict("periodic")
    return {key: state[key] for key in LOADED_KEYS}


LOADED_KEYS = ("state_dict", "optimizer", "scheduler", "data", "rng", "epoch", "step_in_epoch", "global_step",
               "metrics", "history")  # fmt: skip


def assert_loaded_exactly(actual, expected, where="checkpoint") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_loaded_exactly(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=False)):
            assert_loaded_exactly(a, e, f"{where}[{index}]")
    else:
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"


def outcome(
    run: InProcessRun, forged: bytes, content: dict, real: bool = False, may_be_incompatible: bool = False
) -> str:
    """Resume from `forged`, whose content is `content` if it loads (`real`: the real checkpoint's):
    either it is used exactly (its content is what the trainer's objects hold) or it is set aside
    with checkpoint_invalid and the fallback is used; then train to the end."""
    events, incompatible = run.resume_from(forged)
    if incompatible is not None:
        assert may_be_incompatible, incompatible
        return "incompatible"
    names = [event["event"] for event in events]
    (resumed,) = [event for event in events if event["event"] == "resumed"]
    if resumed["global_step"] == TARGET:
        assert "checkpoint_invalid" not in names, events
        assert_loaded_exactly(loaded_state(run.trainer), {key: content[key] for key in LOADED_KEYS})
        result = "used"
    else:
        (invalid,) = [event for event in events if event["event"] == "checkpoint_invalid"]
        assert invalid["path"] == str(run.target) and invalid["moved_to"] == str(run.target) + ".invalid", events
        assert resumed["global_step"] == FALLBACK
        result = "set aside"
    assert run.train_to_end() == ExitCode.COMPLETE
    if result == "set aside" or real:  # real checkpoints only: the run ends as the unbroken one
        assert_same_training(final_checkpoint(run.directory), run.reference)
    return result


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_content_is_set_aside_with_its_reason(in_process, name):
    forgery, reason = FORGERIES[name]
    state = in_process.target_content()
    forgery(state)

    events, _ = in_process.resume_from(saved(state))

    (invalid,) = [event for event in events if event["event"] == "checkpoint_invalid"]
    assert reason in invalid["reason"], invalid["reason"]
    assert outcome(in_process, saved(state), state) == "set aside"


def test_the_real_checkpoint_is_used_exactly(in_process):
    assert outcome(in_process, in_process.files[TARGET][1], in_process.target_content(), real=True) == "used"


# -- fuzz: random mutations of the bytes and of the content of a real checkpoint -----------------

MUTATIONS = 150  # of each kind


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    where = rng.randrange(len(data))
    kind = rng.choice(["flip", "flips", "truncate", "zero range", "insert", "delete", "duplicate"])
    if kind == "flip":
        data[where] ^= 1 << rng.randrange(8)
    elif kind == "flips":
        for _ in range(rng.randint(2, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        del data[where:]
    elif kind == "zero range":
        data[where : where + rng.randint(1, 4096)] = bytes(len(data[where : where + rng.randint(1, 4096)]))
    elif kind == "insert":
        data[where:where] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete":
        del data[where : where + rng.randint(1, 64)]
    else:
        data[where:where] = data[where : where + rng.randint(1, 256)]
    return bytes(data)


def _nodes(tree, path=()):
    """Every (path, value) of a checkpoint's tree, containers and leaves alike."""
    yield path, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _nodes(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _nodes(value, (*path, index))


def _replacements(value, rng: random.Random) -> list:
    options = [None, "x", 0, -1, 2**64, 1.5, float("nan"), float("inf"), True, [], {}, torch.zeros(0)]
    if isinstance(value, torch.Tensor):
        flat = value.flatten()
        changed = flat.clone()
        if len(changed):
            changed[rng.randrange(len(changed))] = 1 if value.dtype != torch.bool else True
        options += [
            value.double(),
            value.long(),
            value.to(torch.uint8),
            flat[:-1],
            value.unsqueeze(0),
            torch.cat([flat, flat[:1]]),
            changed.view_as(value),
            value.t() if value.dim() == 2 else value * 2,
        ]
    elif isinstance(value, bool):
        options += [not value, int(value)]
    elif isinstance(value, int):
        options += [value + 1, value - 1, -value - 1, value * 1000, float(value), str(value), 2**31]
    elif isinstance(value, float):
        options += [value * 2, -value, int(value), str(value), 0.0]
    elif isinstance(value, str):
        options += ["", value + "x", value.upper()]
    elif isinstance(value, dict) and value:
        dropped = dict(value)
        dropped.pop(rng.choice(list(value)))
        options += [dropped, {**value, "extra": 1}, list(value.values())]
    elif isinstance(value, (list, tuple)) and value:
        options += [
            value[:-1],
            type(value)([*value, value[-1]]),
            type(value)(reversed(value)),
            tuple(value) if isinstance(value, list) else list(value),
        ]
    return options  # fmt: skip


def mutate_content(state: dict, rng: random.Random) -> tuple[dict, tuple]:
    state = copy.deepcopy(state)
    path, value = rng.choice([(p, v) for p, v in _nodes(state) if p])
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    replacement = rng.choice(_replacements(value, rng))
    if isinstance(parent, tuple):  # betas: rebuild the tuple in its own parent
        grandparent = state
        for key in path[:-2]:
            grandparent = grandparent[key]
        grandparent[path[-2]] = tuple(replacement if i == path[-1] else v for i, v in enumerate(parent))
    else:
        parent[path[-1]] = replacement
    return state, path


def test_random_mutations_are_used_exactly_or_set_aside(in_process):
    """Seeded: each mutated checkpoint is either loaded exactly as it reads or set aside with
    checkpoint_invalid (then the run goes on from the previous one and ends bitwise as an
    unbroken run); a changed config may be refused as incompatible. Nothing crashes."""
    rng = random.Random(20240610)
    real, content = in_process.files[TARGET][1], in_process.target_content()
    counts: dict[str, int] = {}
    for _ in range(MUTATIONS):
        forged = mutate_bytes(real, rng)
        result = outcome(in_process, forged, content, real=True)
        counts[f"bytes {result}"] = counts.get(f"bytes {result}", 0) + 1
    for _ in range(MUTATIONS):
        state, path = mutate_content(content, rng)
        # Another config, fingerprint or count of ranks is refused (78, the file kept), not set aside.
        refusable = path[0] in ("config", "fingerprint", "world_size")
        result = outcome(in_process, saved(state), state, may_be_incompatible=refusable)
        counts[f"content {result}"] = counts.get(f"content {result}", 0) + 1
    assert counts["bytes set aside"] > MUTATIONS / 2 and counts["content set aside"] > MUTATIONS / 3, counts
