"""`trainer verify` through the real CLI: PASS on an exact configuration, FAIL on a model that is not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

from trainer_proc import RunConfig

# A model whose first training forward pass in each process is nudged, as one that keeps state
# outside its state_dict (a lazily built buffer, a call counter) would be: exact within one process,
# not across a restart. Loaded into every Python process started with this directory on PYTHONPATH.
FRESH_PROCESS_DIFFERS = """
import torch

_forward = torch.nn.Linear.forward
_first_call = [True]


def forward(self, x):
    out = _forward(self, x)
    if self.training and _first_call[0]:
        _first_call[0] = False
        out = out + 1e-3
    return out


torch.nn.Linear.forward = forward
"""


def verify(config: RunConfig, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = config.write()
    return subprocess.run(
        [sys.executable, "-m", "daemon", "verify", "--config", str(path), "--steps", "40", "--json", *extra],
        cwd=config.workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_verify_passes_on_an_exact_configuration(run_config):
    result = verify(run_config)

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["steps"] == 40 and report["first_difference"] is None
    assert [i["signal"] for i in report["interruptions"]] == ["SIGUSR1", "SIGKILL", "SIGTERM"]
    assert report["interruptions"][1]["resumed_from"]["kind"] == "periodic"
    assert report["interruptions"][2]["resumed_from"]["kind"] == "emergency"
    assert not list(run_config.workdir.glob("checkpoints*")), "verify trains in a scratch directory only"


def test_verify_reports_where_a_resumed_run_parts(run_config, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(FRESH_PROCESS_DIFFERS))

    result = verify(run_config, env={"PYTHONPATH": str(site)})

    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert not report["passed"]
    assert report["first_difference"].startswith("state_dict."), report
    # The first process matches the unbroken run; the one resumed after SIGKILL parts from it.
    resumed_at = report["interruptions"][1]["resumed_from"]["global_step"]
    assert report["equal_up_to_step"] == resumed_at
    assert report["differs_from_step"] > resumed_at
    assert os.path.isdir(report["kept"])
    shutil.rmtree(report["kept"])


def test_verify_refuses_a_bad_config_with_78(run_config):
    run_config.settings = {"train.batch_size": 0}

    result = verify(run_config)

    assert result.returncode == 78
    assert json.loads(result.stdout.splitlines()[0])["event"] == "config_error"
