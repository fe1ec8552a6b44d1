"""Every bad configuration ends the real CLI with exit 78, one clear message, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from daemon.config import Config

CASES = {
    "not yaml": ("data: [unclosed\n", [], "not valid YAML"),
    "top level a list": ("- 1\n- 2\n", [], "top level must be a mapping"),
    "unknown section": ("trainning:\n  epochs: 1\n", [], "trainning: unknown key"),
    "unknown key": ("train:\n  epoch: 1\n", [], "train.epoch: unknown key"),
    "wrong type": ("train:\n  epochs: five\n", [], "train.epochs: must be int"),
    "bool for a number": ("train:\n  batch_size: true\n", [], "train.batch_size: must be int"),
    "out of range": ("train:\n  batch_size: 0\n", [], "train.batch_size: must be >= 1"),
    "section not a mapping": ("model: 5\n", [], "model: must be a mapping"),
    "list of wrong items": ("model:\n  hidden: [500, wide]\n", [], "model.hidden[1]: must be int"),
    "bad device": ("train:\n  device: tpu\n", [], "train.device"),
    "bad scheduler": ("optim:\n  scheduler:\n    name: linear\n", [], "optim.scheduler.name"),
    "scheduler missing its name": ("optim:\n  scheduler:\n    gamma: 0.5\n", [], "optim.scheduler.name: required"),
    "override without =": ("", ["--set", "train.epochs"], "expected section.key=value"),
    "override of an unknown key": ("", ["--set", "train.nope=1"], "train.nope: unknown key"),
    "override out of range": ("", ["--set", "checkpoint.keep_last=0"], "checkpoint.keep_last: must be >= 1"),
}


def run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "run", *args],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_config_exits_78_with_a_clear_message(tmp_path, case):
    text, extra, expected = CASES[case]
    config = tmp_path / "bad.yaml"
    config.write_text(text)

    result = run_cli(tmp_path, "--config", str(config), *extra)

    assert result.returncode == 78, result.stdout + result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["event"] == "config_error" and record["level"] == "error"
    assert str(config) in record["message"] and expected in record["message"], record["message"]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_missing_config_file_exits_78(tmp_path):
    result = run_cli(tmp_path, "--config", "nowhere.yaml")

    assert result.returncode == 78
    assert "nowhere.yaml: cannot read the config file" in json.loads(result.stdout)["message"]


def test_shipped_config_is_the_seed_recipe(request):
    cfg = Config.from_yaml(request.config.rootpath / "config.yaml")

    assert (cfg.model.hidden, cfg.optim.name, cfg.optim.lr) == ([500], "adam", 1e-3)
    assert (cfg.train.batch_size, cfg.train.epochs) == (100, 5)


def test_overrides_parse_values_as_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent("""\
        train:
          epochs: 2
    """))

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

    assert safe.exactness_fingerprint() == base.exactness_fingerprint()
    assert unsafe.exactness_fingerprint() != base.exactness_fingerprint()
