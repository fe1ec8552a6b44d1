"""Fixtures of the SLURM tier: one real one-node cluster for the session (tests/slurm_cluster.py),
and the shipped batch scripts of examples/slurm/ submitted to it as a user would submit them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slurm_cluster import Job, SlurmCluster, missing_requirements
from trainer_proc import RunConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "slurm"
# The console script the package installs beside this interpreter (the venv's bin/trainer).
TRAINER = Path(sys.executable).with_name("trainer")


def skip(reason: str) -> None:
    print(f"SKIP: {reason}", file=sys.stderr)  # visible in the log, not only with -rs
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    problems = missing_requirements()
    if problems:
        skip("SLURM cluster unavailable: " + "; ".join(problems))
    if not TRAINER.exists():
        skip(f"{TRAINER} not found: run the tests with the venv's python, where `trainer` is installed")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, left empty and with its node free after each test, whatever the test did."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
    slurm_cluster.release_node()


@pytest.fixture
def submit(slurm: SlurmCluster) -> Callable[..., Job]:
    """submit(script, run_config, *sbatch_options) -> Job: a script of examples/slurm/ on the run's
    config, from its folder (the checkpoints land in run_config.checkpoint_dir)."""

    def submit(script: str, run_config: RunConfig, *options: str) -> Job:
        config = run_config.write()
        return slurm.sbatch(
            EXAMPLES / script,
            *options,
            args=["--config", str(config)],
            workdir=run_config.workdir,
            env={"TRAINER": str(TRAINER)},
        )

    return submit
