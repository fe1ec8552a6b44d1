"""task.options takes what every checkpoint keeps exactly, and a config file's aliases cannot blow it
up: anything else is a ConfigError naming the key, found while the file is read.
(The CLI's exit 78 for one of them: tests/process/test_refused_options.py.)"""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch

from daemon.ckpt.schema import FORMAT_VERSION, check_format
from daemon.ckpt.store import read_checkpoint
from daemon.config.exactness import exactness_fingerprint
from daemon.config.sections import Config
from daemon.errors import ConfigError

TASK = "task:\n  entry: examples/mnist_cnn.py:build\n"

REFUSED = {
    "a date": ("task.options.when=2024-01-01", "task.options.when: a date"),
    "a timestamp": ("task.options.when=2024-01-01T10:00:00Z", "task.options.when: a timestamp"),
    "binary data": ("task.options.blob=!!binary aGVsbG8=", "task.options.blob: binary data"),
    "a set": ("task.options.names=!!set {a, b}", "task.options.names: a set"),
    "NaN": ("task.options.rate=.nan", "task.options.rate: nan is not a finite number"),
    "infinity": ("task.options.rate=-.inf", "task.options.rate: -inf is not a finite number"),
    "NaN in a list": ("task.options.rates=[1.0, .nan]", "task.options.rates[1]: nan is not a finite number"),
    "a list of mappings": ("task.options.x=[{a: 1}]", "task.options.x[0]: a mapping inside a list"),
    "a list of lists": ("task.options.x=[[1, 2]]", "task.options.x[0]: a list inside a list"),
    "an ordered mapping": ("task.options.x=!!omap [a: 1]", "task.options.x[0]: a pair of !!omap"),
    # Stored flat, these would be indistinguishable from another value: a change would pass a resume.
    "an empty mapping": ("task.options.x={}", "task.options.x: an empty mapping"),
    "a dotted name": ("task.options.x={a.b: 1}", "task.options.x: 'a.b' is not a name"),
    "a name that is a number": ("task.options.x={1: 1}", "task.options.x: 1 is not a name"),
    "a date deep down": ("task.options.a={b: {c: [2024-01-01]}}", "task.options.a.b.c[0]: a date"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_options_a_checkpoint_would_not_keep_exactly_are_refused(tmp_path, case):
    override, expected = REFUSED[case]
    (tmp_path / "c.yaml").write_text(TASK)

    with pytest.raises(ConfigError) as refused:
        Config.from_yaml(tmp_path / "c.yaml", [override])

    assert expected in str(refused.value) and "task.options takes null, booleans" in str(refused.value)


def test_the_same_refusal_in_the_file_itself(tmp_path):
    (tmp_path / "c.yaml").write_text(TASK + "  options:\n    when: 2024-01-01\n")

    with pytest.raises(ConfigError, match="c.yaml: task.options.when: a date"):
        Config.from_yaml(tmp_path / "c.yaml")


def test_plain_options_round_trip_through_a_checkpoint_exactly(tmp_path):
    (tmp_path / "c.yaml").write_text(
        TASK
        + "  options:\n"
        + "    width: 32\n    huge: 100000000000000000000000\n    rate: -0.0\n    name: é\n    unset: null\n"
        + "    flag: true\n    sizes: [1, 2.5, null, false, s]\n    empty: []\n    nested: {a: {b: [1]}, c: x}\n"
    )
    settings = Config.from_yaml(tmp_path / "c.yaml").flat()
    path = tmp_path / "state.pt"
    state = {
        "format_version": FORMAT_VERSION, "kind": "final", "epoch": 0, "step_in_epoch": 0, "global_step": 0,
        "metrics": {}, "history": [], "config": settings, "fingerprint": exactness_fingerprint(settings),
    }  # fmt: skip
    torch.save(state, path)

    loaded = read_checkpoint(path)
    check_format(loaded, path)
    # repr tells 1 from 1.0 and True, -0.0 from 0.0: what the fingerprint tells apart too.
    assert repr(loaded["config"]) == repr(settings)
    assert exactness_fingerprint(loaded["config"]) == state["fingerprint"]
    assert loaded["config"]["task.options.nested.a.b"] == [1]


def nested_aliases(levels: int, width: int = 9) -> str:
    """A "billion laughs": each level a list of `width` aliases of the one before."""
    lines = [f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return TASK + "  options:\n" + "\n".join(lines) + "\n"


@contextlib.contextmanager
def at_most(seconds: float):
    """Interrupt the block with TimeoutError once `seconds` have passed (this process's main thread)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    (tmp_path / "c.yaml").write_text(nested_aliases(levels=9))  # 9**9 values expanded

    # A safety net against a hang: the refusal comes before anything is expanded, in milliseconds.
    with at_most(10), pytest.raises(ConfigError, match="with its aliases expanded, it holds more than 100,000 values"):
        Config.from_yaml(tmp_path / "c.yaml")


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text(TASK)

    with pytest.raises(ConfigError, match="an alias inside the collection it names"):
        Config.from_yaml(tmp_path / "c.yaml", ["task.options.x=&a [*a]"])


def test_nesting_deeper_than_the_parser_goes_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text(TASK + "  options:\n    x: " + "[" * 1000 + "]" * 1000 + "\n")

    with pytest.raises(ConfigError, match="c.yaml: nested too deeply"):
        Config.from_yaml(tmp_path / "c.yaml")


def test_ordinary_anchors_and_aliases_stay_valid(tmp_path):
    (tmp_path / "c.yaml").write_text(
        TASK + "  options:\n    sizes: &sizes [1, 2]\n    again: *sizes\n    rate: &rate 0.5\noptim:\n  lr: *rate\n"
    )

    config = Config.from_yaml(tmp_path / "c.yaml")

    assert config.task.options == {"sizes": [1, 2], "again": [1, 2], "rate": 0.5}
    assert config.optim.lr == 0.5
