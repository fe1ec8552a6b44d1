"""The agreement: every rank acts on the same stop and save requests after the same step.

Under DDP the requests travel with the gradients (DDP reduces them in a bucket with the model's), so a
signal that reached any rank is acted on by all of them at most two step boundaries later, with
no collective of its own per step. Under FSDP, which shards every gradient, `BoundaryAgreement`
reduces them at each step boundary instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Requests:
    """What the loop is asked to do at a step boundary."""

    stop: bool = False  # SIGTERM/SIGINT: emergency checkpoint and exit
    save: bool = False  # SIGUSR1: a checkpoint now, then go on
    periodic: bool = False  # checkpoint.every_seconds has passed (by some rank's clock)

    def __or__(self, other: Requests) -> Requests:
        return Requests(
            stop=self.stop or other.stop, save=self.save or other.save, periodic=self.periodic or other.periodic
        )


class BoundaryCost:
    """What agreeing costs a rank: the time its boundaries spend handing and reading the ranks' flags,
    against the steps from boundary to boundary (an evaluation or a save between epochs is no step)."""

    def __init__(self) -> None:
        self.boundaries = self.steps = 0
        self.hand_s = self.read_s = self.steps_s = 0.0
        self._last_boundary: float | None = None

    def boundary(self, started: float) -> None:
        """A boundary whose reading of the flags began at `started` (time.perf_counter) just ended."""
        now = time.perf_counter()
        self.read_s += now - started
        if self._last_boundary is not None:
            self.steps_s += now - self._last_boundary
            self.steps += 1
        self._last_boundary = now
        self.boundaries += 1

    def pause(self) -> None:
        self._last_boundary = None

    def report(self) -> dict:
        hand_ms = self.hand_s / max(self.boundaries, 1) * 1e3
        read_ms = self.read_s / max(self.boundaries, 1) * 1e3  # waits for the slowest rank included
        step_ms = self.steps_s / max(self.steps, 1) * 1e3
        share = 100 * (hand_ms + read_ms) / step_ms if self.steps else 0.0  # of a step, boundary to boundary
        return {
            "boundaries": self.boundaries,
            "hand_ms_mean": round(hand_ms, 4),
            "read_ms_mean": round(read_ms, 4),
            "step_ms_mean": round(step_ms, 3),
            "share_of_step_percent": round(share, 2),
        }


class Agreement:
    """The ranks' pending requests, combined so that every rank acts on the same ones after the
    same step.

    They travel as the gradient of a parameter of their own, three numbers that DDP reduces in a
    bucket with the model's gradients: each backward starts by handing this rank's flags to that
    gradient (`carry`, on the loss), and the step boundary reads the reduced one (a mean: above
    zero where any rank asks). No collective of its own and no copy. A request recorded before a
    step's backward begins is acted on at its boundary, a later one at the next: at most two
    boundaries after a signal reached any rank. Reading a flag leaves its request pending (a
    SIGUSR1 is consumed as its checkpoint is made), so the flags of a backward that is undone (the
    settling pass's) lose nothing.
    """

    def __init__(self, group: dist.ProcessGroup, local: Callable[[], Requests]) -> None:
        self.group = group  # for the synchronous checks between epochs
        self._local = local  # this rank's pending requests, read as a backward begins
        self.flags: nn.Parameter | None = None  # on the model's device, once `replicate` placed them
        self._carried = Requests()  # agreed by a stop check between epochs, acted on at the next boundary
        self.costs = BoundaryCost()

    def replicate(self, model: nn.Module, device_ids: list[int] | None) -> nn.parallel.DistributedDataParallel:
        """`model` under DDP, with the flags among the parameters whose gradients it reduces."""
        first = next(model.parameters())  # its dtype, so that the flags share a bucket with gradients
        self.flags = nn.Parameter(torch.zeros(3, dtype=first.dtype, device=first.device))
        both = nn.Module()
        both.model, both.flags = model, self.flags
        # Without find_unused_parameters DDP skips a walk of the autograd graph at every step (~10% of
        # an MLP step); the price is a bucket layout that changes after a process's first backward,
        # which `Stepper` settles before the first step (daemon/stepping.py).
        replicated = nn.parallel.DistributedDataParallel(both, device_ids=device_ids)
        # DDP took the parameters to reduce (and the buffers to broadcast) as it was built. From here
        # the module it runs, and the one a task sees through it, is the model alone: its
        # `parameters()`, `module` and state are the model's, without the flags.
        replicated.module = model
        return replicated

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, whose backward hands this rank's flags to theirs: what the backward starts from."""
        return _HandFlags.apply(loss, self.flags, self)

    def local_flags(self) -> torch.Tensor:
        started = time.perf_counter()
        local = self._local()
        assert self.flags is not None  # `replicate` placed them as the run was assembled
        flags = torch.tensor((local.stop, local.save, local.periodic), dtype=self.flags.dtype, device=self.flags.device)
        self.costs.hand_s += time.perf_counter() - started
        return flags

    def _read(self) -> Requests:
        """What the backwards since the last read (every step has one) brought back from every rank."""
        assert self.flags is not None  # `replicate` placed them as the run was assembled
        reduced, self.flags.grad = self.flags.grad, None
        if reduced is None:  # none since the stop check between epochs read them
            return Requests()
        stop, save, periodic = reduced.tolist()
        return Requests(stop=stop > 0, save=save > 0, periodic=periodic > 0)

    def settle(self) -> Requests:
        """At a step boundary: the requests every rank acts on now."""
        started = time.perf_counter()
        carried, self._carried = self._carried, Requests()
        requests = self._read()
        self.costs.boundary(started)
        return carried | requests

    def stop_agreed(self, stop: bool) -> bool:
        """Whether any rank asks to stop, now (synchronously): between epochs and at start-up.
        Requests the last backward brought back are kept for the next boundary."""
        self._carried = self._carried | self._read()
        self.costs.pause()
        asked = torch.tensor([stop or self._carried.stop], dtype=torch.uint8)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=self.group)
        return bool(asked.item())

    def cost(self) -> dict:
        return self.costs.report()


class _HandFlags(torch.autograd.Function):
    """The identity on the loss; its backward, the first of a step, gives the flags parameter this
    rank's requests as its gradient."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, flags: torch.Tensor, agreement: Agreement) -> torch.Tensor:
        ctx.agreement = agreement
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, ctx.agreement.local_flags(), None


class BoundaryAgreement:
    """The agreement where no DDP bucket carries the flags: FSDP reduce-scatters each gradient into
    shards, so a parameter of the flags' own would reach each rank only in part. One small all_reduce
    of this rank's flags at each step boundary instead (the handlers still only record; the ranks
    agree here, never inside a handler): a request recorded before a boundary is acted on at it."""

    def __init__(self, group: dist.ProcessGroup, local: Callable[[], Requests]) -> None:
        self.group = group
        self._local = local
        self.costs = BoundaryCost()

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def settle(self) -> Requests:
        started = time.perf_counter()
        local = self._local()
        flags = torch.tensor((local.stop, local.save, local.periodic), dtype=torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        stop, save, periodic = flags.tolist()
        self.costs.boundary(started)
        return Requests(stop=bool(stop), save=bool(save), periodic=bool(periodic))

    def stop_agreed(self, stop: bool) -> bool:
        self.costs.pause()
        asked = torch.tensor([stop], dtype=torch.uint8)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=self.group)
        return bool(asked.item())

    def cost(self) -> dict:
        return self.costs.report()
