"""Every bad configuration ends the real CLI with exit 78, one clear message, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
    "seed beyond 32 bits": ("train:\n  seed: 4294967296\n", [], "train.seed: must be in [0, 4294967295]"),
    "seed of 2**64": ("train:\n  seed: 18446744073709551616\n", [], "train.seed: must be in [0, 4294967295]"),
    "negative seed": ("train:\n  seed: -1\n", [], "train.seed: must be in [0, 4294967295]"),
    "infinite learning rate": ("optim:\n  lr: .inf\n", [], "optim.lr: must be a finite number, got inf"),
    "NaN dropout": ("model:\n  dropout: .nan\n", [], "model.dropout: must be a finite number, got nan"),
    "NaN in an override": (
        "",
        ["--set", "checkpoint.every_seconds=.NaN"],
        "checkpoint.every_seconds: must be a finite",
    ),
    "integer beyond any float": ("optim:\n  lr: 1" + "0" * 400 + "\n", [], "optim.lr: must be a finite number"),
    "duplicate key": (
        "optim:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n",
        [],
        "key 'lr' appears twice in one mapping, at lines 2 and 4",
    ),
    "rendezvous without a port": (
        "",
        ["--set", "dist.rdzv_endpoint=localhost"],
        "dist.rdzv_endpoint: 'localhost' must be host:port",
    ),
    "unknown backend": ("dist:\n  backend: mpi\n", [], "dist.backend: must be one of auto, gloo, nccl"),
    "no ranks": ("", ["--set", "dist.nproc_per_node=0"], "dist.nproc_per_node: must be >= 1"),
    "duplicate section": (
        "train:\n  epochs: 1\ntrain:\n  seed: 2\n",
        [],
        "key 'train' appears twice in one mapping, at lines 1 and 3",
    ),
    "non-string key": ("1: a\nfoo: b\n", [], "1: not a setting name"),
    "non-string key in a section": ("train:\n  true: 1\n", [], "train.True: not a setting name"),
    "invalid UTF-8": (b"train:\n  epochs: \xff\xfe\n", [], "not UTF-8 text: invalid start byte at byte 17"),
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
    config.write_bytes(text if isinstance(text, bytes) else text.encode())

    result = run_cli(tmp_path, "--config", str(config), *extra)

    assert result.returncode == 78, result.stdout + result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["event"] == "config_error" and record["level"] == "error"
    assert str(config) in record["message"] and expected in record["message"], record["message"]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


# Found when the run is built, before anything is written (data.root is never reached).
BUILD_CASES = {
    "a CUDA device this machine lacks": ("train:\n  device: cuda:99\n", "train.device: cuda:99, but this machine has"),
    "a model that cannot be allocated": ("model:\n  hidden: [100000000]\n",
                                         "model.hidden: [100000000] makes a model of 296.2 GiB"),
}  # fmt: skip


@pytest.mark.parametrize("case", BUILD_CASES)
def test_config_that_cannot_be_built_exits_78_before_writing(tmp_path, case):
    text, expected = BUILD_CASES[case]
    (tmp_path / "bad.yaml").write_text(text)

    result = run_cli(tmp_path, "--config", "bad.yaml")

    assert result.returncode == 78, result.stdout + result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["event"] == "config_error" and expected in record["message"], record["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_exits_78(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  device: cuda\n")

    result = run_cli(tmp_path, "--config", "bad.yaml")

    assert result.returncode == 78
    assert "train.device: cuda, but this machine has 0 CUDA device(s)" in json.loads(result.stdout)["message"]


def test_checkpoint_dir_that_is_a_file_exits_78_at_start_up(tmp_path):
    (tmp_path / "bad.yaml").write_text("checkpoint:\n  dir: taken\n")
    (tmp_path / "taken").write_text("a file")

    result = run_cli(tmp_path, "--config", "bad.yaml")

    assert result.returncode == 78
    assert "checkpoint.dir: taken exists and is not a directory" in json.loads(result.stdout)["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "taken"]


def test_missing_config_file_exits_78(tmp_path):
    result = run_cli(tmp_path, "--config", "nowhere.yaml")

    assert result.returncode == 78
    assert "nowhere.yaml: cannot read the config file" in json.loads(result.stdout)["message"]
