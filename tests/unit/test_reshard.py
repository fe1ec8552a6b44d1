"""A sharded run resumed at another world size, without ranks: which rank-keyed entry each new rank
loads, the running sums kept whole, the checkpoint's entries checked against the ranks that saved
them, and `dist.allow_reshard: false` refusing it. (The run: tests/dist/test_fsdp.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_sharded import committed

from daemon.ckpt.logged_step import LoggedStep
from daemon.ckpt.resume import Resumer
from daemon.ckpt.schema import InvalidCheckpoint
from daemon.ckpt.sharded import ShardedStore
from daemon.dist.group import seed_after_reshard
from daemon.dist.rank_state import RankKeyed
from daemon.errors import IncompatibleCheckpoint
from daemon.train.state import RunningSums, TrainProgress


class Kept:
    def __init__(self) -> None:
        self.value = None

    def state_dict(self) -> dict:
        return {"count": 0}

    def load_state_dict(self, state: dict) -> None:
        self.value = state


def ranks(rank: int, world_size: int) -> SimpleNamespace:
    return SimpleNamespace(rank=rank, world_size=world_size)


TWO_RANKS = {"rank_0": {"count": 10}, "rank_1": {"count": 11}}


@pytest.mark.parametrize(("rank", "loaded"), [(0, 10), (1, 11), (2, 10)])
def test_a_new_rank_takes_rank_0s_entry_the_old_ones_their_own(rank, loaded):
    part = Kept()
    RankKeyed(part, ranks(rank, 3)).load_state_dict(TWO_RANKS)  # type: ignore[arg-type]
    assert part.value == {"count": loaded}


def test_the_entries_are_checked_against_the_ranks_that_saved_them():
    keyed = RankKeyed(Kept(), ranks(0, 3))  # type: ignore[arg-type]
    keyed.check_state(TWO_RANKS, {"world_size": 2}, "task")
    with pytest.raises(InvalidCheckpoint, match="one entry for each of the 3 rank"):
        keyed.check_state(TWO_RANKS, {"world_size": 3}, "task")
    with pytest.raises(InvalidCheckpoint, match="task.rank_1.count"):
        keyed.check_state({**TWO_RANKS, "rank_1": {"count": 1.5}}, {"world_size": 2}, "task")


def test_the_running_sums_go_whole_to_rank_0():
    """The checkpoint's `metrics` are the sum over the old ranks; summed over the new ones, the same."""
    checkpoint = {"epoch": 0, "step_in_epoch": 3, "global_step": 3, "history": []}
    checkpoint["metrics"] = {"loss_sum": 6.0, "samples": 48, "sums": {"abs_error": 3.0}}
    entries = {f"rank_{rank}": {"loss_sum": 3.0, "samples": 24, "sums": {"abs_error": 1.5}} for rank in (0, 1)}
    summed = []
    for rank in range(3):
        progress = TrainProgress()
        progress.load_state_dict(checkpoint)
        RankKeyed(RunningSums(progress), ranks(rank, 3)).load_state_dict(entries)  # type: ignore[arg-type]
        summed.append((progress.loss_sum.item(), progress.own_samples, progress.metric_sums["abs_error"].item()))
    assert summed == [(6.0, 48, 3.0), (0.0, 0, 0.0), (0.0, 0, 0.0)]


def test_every_rank_gets_a_stream_of_its_own_after_a_reshard():
    seeds = {seed_after_reshard(42, rank, 100) for rank in range(3)} | {seed_after_reshard(42, 0, 101)}
    assert len(seeds) == 4 and all(0 <= seed < 2**32 for seed in seeds)
    assert seed_after_reshard(42, 1, 100) == seed_after_reshard(42, 1, 100)


def test_allow_reshard_false_refuses_another_world_size(tmp_path):
    store = ShardedStore(tmp_path, keep_last=5)
    committed(store, 3, world_size=2)
    resumer = Resumer(store, LoggedStep(tmp_path), settings={}, fingerprint="f", cpu_threads_setting=None,
                      world_size=3, reshards=False)  # fmt: skip
    with pytest.raises(IncompatibleCheckpoint, match="trained by 2 rank.*has 3.*set dist.allow_reshard: true"):
        resumer.resume(schema=None, load=lambda state: None, position=dict)  # type: ignore[arg-type]
