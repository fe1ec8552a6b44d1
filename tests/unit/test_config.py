"""The configuration read in this process: the shipped file, overrides read as YAML, the fingerprint.
(What the CLI does with a bad one: tests/process/test_config_errors.py.)"""

from __future__ import annotations

import textwrap

from daemon.config.exactness import exactness_fingerprint
from daemon.config.sections import Config


def test_shipped_config_is_the_seed_recipe(request):
    cfg = Config.from_yaml(request.config.rootpath / "config.yaml")

    assert (cfg.model.hidden, cfg.optim.name, cfg.optim.lr) == ([500], "adam", 1e-3)
    assert (cfg.train.batch_size, cfg.train.epochs) == (100, 5)


def test_overrides_parse_values_as_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        textwrap.dedent("""\
        train:
          epochs: 2
    """)
    )

    cfg = Config.from_yaml(config, ["model.hidden=[64, 32]", "optim.scheduler.name=step", "checkpoint.every_seconds=1"])

    assert cfg.model.hidden == [64, 32]
    assert cfg.optim.scheduler.name == "step"
    assert cfg.checkpoint.every_seconds == 1.0 and isinstance(cfg.checkpoint.every_seconds, float)
    assert cfg.train.epochs == 2


def test_fingerprint_ignores_resume_safe_settings_only():
    base = Config()
    safe = Config()
    safe.train.epochs, safe.data.num_workers, safe.checkpoint.keep_last = 9, 2, 1
    unsafe = Config()
    unsafe.train.batch_size = 50

    assert exactness_fingerprint(safe.flat()) == exactness_fingerprint(base.flat())
    assert exactness_fingerprint(unsafe.flat()) != exactness_fingerprint(base.flat())
    other_task = {**base.flat(), "task.entry": "examples/mnist_cnn.py:build"}
    assert exactness_fingerprint(other_task) != exactness_fingerprint(base.flat())
