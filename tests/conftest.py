from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.builtin.mnist_files import prepare_mnist
from trainer_proc import RunConfig, TrainerProcess, final_checkpoint


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """MNIST laid out once for the whole session, as `trainer run` would lay it out."""
    root = tmp_path_factory.mktemp("mnist")
    prepare_mnist(root, download=False)
    return root


@pytest.fixture
def run_config(mnist_root, tmp_path) -> RunConfig:
    return RunConfig(workdir=tmp_path, data_root=mnist_root)


@pytest.fixture(scope="session")
def reference_runs(mnist_root, tmp_path_factory):
    """Uninterrupted runs, one per distinct set of settings, computed once per session."""
    cache: dict[str, dict] = {}

    def get(**settings) -> dict:
        key = json.dumps(settings, sort_keys=True)
        if key not in cache:
            config = RunConfig(workdir=tmp_path_factory.mktemp("reference"), data_root=mnist_root, settings=settings)
            process = TrainerProcess.start(config)
            assert process.wait() == 0, process.output()
            cache[key] = final_checkpoint(config.checkpoint_dir)
        return cache[key]

    return get
