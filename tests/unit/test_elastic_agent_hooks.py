"""torch's elastic agent, where the launcher (daemon/dist/launch.py) reaches into it.

`_Agent` overrides two private methods of torch's LocalElasticAgent: torch (2.14) offers no
public way to say that a group whose every rank ended with a final exit (75, 78, ...) is finished
rather than failed (the agent would restart it), nor to hear of a restart. So the launcher relies
on how SimpleElasticAgent's run loop uses them, checked here; checked against torch 2.14.1, and
pyproject.toml keeps torch below 2.15 until these pass on a newer one (with tests/dist, which
shows the behaviour: a stop is not restarted, a killed rank is).
"""

from __future__ import annotations

import dataclasses
import inspect

from torch.distributed.elastic.agent.server.api import RunResult, SimpleElasticAgent, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from daemon.dist.launch import _Agent


def test_the_overridden_methods_take_the_worker_group_alone():
    for name in ("_monitor_workers", "_restart_workers"):
        theirs = inspect.signature(getattr(LocalElasticAgent, name))
        ours = inspect.signature(getattr(_Agent, name))
        assert list(theirs.parameters) == ["self", "worker_group"] == list(ours.parameters), name


def test_the_run_loop_acts_on_what_monitor_workers_returns_and_restarts_through_restart_workers():
    """The group's state is what `_monitor_workers` returns; a FAILED one with restarts left takes
    one off `_remaining_restarts` (which the launcher's `ranks_restarting` reports), then calls
    `_restart_workers`; a SUCCEEDED one ends the run with that result."""
    loop = inspect.getsource(SimpleElasticAgent._invoke_run)
    monitor = loop.index("run_result = self._monitor_workers(self._worker_group)")
    succeeded = loop.index("if state == WorkerState.SUCCEEDED:", monitor)
    assert "return run_result" in loop[succeeded : loop.index("elif", succeeded)]
    decrement = loop.index("self._remaining_restarts -= 1", monitor)
    assert loop.index("self._restart_workers(self._worker_group)", decrement) > decrement
    init = inspect.getsource(SimpleElasticAgent.__init__)
    assert "self._remaining_restarts = self._worker_group.spec.max_restarts" in init


def test_a_run_result_holds_the_outcome_the_launcher_reads():
    assert {"state", "return_values", "failures"} <= {field.name for field in dataclasses.fields(RunResult)}
    assert {WorkerState.SUCCEEDED, WorkerState.FAILED} <= set(WorkerState)
    assert RunResult(state=WorkerState.FAILED).is_failed() and not RunResult(state=WorkerState.SUCCEEDED).is_failed()
