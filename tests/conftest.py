"""Fixtures and helpers every tier shares, and the tiers themselves.

A test's tier is the folder it lives in, and is its marker (registered in pyproject.toml):

    tests/unit/     the code called directly, no trainer run: seconds   (-m unit)
    tests/process/  the real trainer, as CLI processes with real signals (-m process)
    tests/dist/     several ranks: torch's elastic agent, torchrun, gloo (-m dist)
    tests/systemd/  a real systemd booted in namespaces, as root         (-m systemd)
    tests/slurm/    a real one-node SLURM cluster, batch jobs, as root   (-m slurm)

The helpers beside this file (trainer_proc, tiny_task, checkpoint_files) are importable from every
tier: pyproject.toml puts tests/ on the path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.builtin.mnist_files import prepare_mnist
from trainer_proc import RunConfig, TrainerProcess, final_checkpoint

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "process", "dist", "systemd", "slurm")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test gets its tier's marker; the tiers run fastest first (a stable sort: a module's
    tests stay together, in their order)."""
    order = {}
    for item in items:
        try:
            tier = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            continue  # a test file named on the command line from elsewhere
        if tier not in TIERS:
            folders = ", ".join(f"tests/{name}/" for name in TIERS)
            raise pytest.UsageError(f"{item.nodeid}: a test lives in its tier's folder, one of {folders}")
        item.add_marker(tier)
        order[item] = TIERS.index(tier)
    items.sort(key=lambda item: order.get(item, len(TIERS)))


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    """A test that fails before it stops its run (one of UNTIL_STOPPED epochs, say) leaves no
    process training on."""
    yield
    TrainerProcess.kill_leftovers()


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
