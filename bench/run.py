"""The benchmark: the daemon against a plain PyTorch loop and the seed recipe.

    .venv/bin/python -m bench.run [--quick] [--reps N] [--big-reps N] [--update-docs]

(from the repository root). Every contender is a real process launched from here (the daemon
through its CLI, the others as `python -m bench.NAME`), so all pay the same process costs; their
timings come from the JSON lines they print (the daemon's log events, the markers of
bench/common.py). One run interleaves them (A B C … then again, in a rotated order) so that
the machine's noise spreads over all of them; figures are medians with min–max, throughput
ratios are taken within each repetition (then their median), and the targets are judged on
medians.

1. Throughput, MNIST MLP 784-500-10, Adam, batch 100, one epoch per process: seconds from the
   start of training to the end of the epoch (training, test evaluation, and the checkpoint
   where there is one), for (a) plain_loop.py; (a tuned) the same with glibc's malloc tuned by
   GLIBC_TUNABLES as the daemon tunes it at start, the fair floor the targets are judged against;
   (b) seed_recipe.py; (c) the daemon, default checkpoint policy; (c active) the same with
   train.cpu_wait=active (libgomp's own spin-waiting); (d) the daemon saving every 50 steps
   (asynchronously, the default), and (d sync) the same with checkpoint.async_save=false;
   (c 1 thread) and (d 1 thread): (c) and (d) with train.cpu_threads=1, so that the writer has a
   core the training does not use: (d)/(c) against (d 1 thread)/(c 1 thread) shows what the
   saves cost by competing for the cores.
2. Emergency latency: SIGTERM sent at a random point of a step, to the `checkpoint_saved`
   event of the emergency checkpoint (logged once it is fsynced, renamed and the directory
   fsynced) and to the process exit; for the MLP and for the ~100M-parameter model
   (model.hidden=[5600]*4), against raw_save.py (torch.save + fsync of that very checkpoint,
   each save after a pause, as the daemon's come after training: see raw_save.py).
   The target applies with the background writer idle; a stop during a background save
   waits for it (README, "Signals") and is shown apart.
3. Restart latency: launch to the first completed step (the daemon's first `progress` event,
   with log.progress_every_seconds tiny; the scripts' `first_step` marker), fresh and resumed.
4. Periodic-save stall: how long the loop is blocked per periodic save, the debug event
   `checkpoint_snapshot.stall_ms` when asynchronous, the save's `duration_ms` when synchronous.
5. Memory: peak RSS (wait4's ru_maxrss) of the daemon against the plain loop with the same
   model; a snapshot of the state (the checkpoint's size) is allowed on top.
6. A shared machine: (c), (c active) and (a tuned) each run one epoch on the quiet machine, then
   one beside cores + 1 busy-loop processes; the share of its quiet throughput each keeps.
7. A task of one's own: examples/mnist_cnn.yaml through the daemon (augmentation in 2 workers,
   every sample's RNG seeded) against bench/plain_cnn.py, the plain loop for the same CNN.
8. Durability: a SIGKILL while the background writer is busy (a save every step), then
   `trainer status`: every checkpoint left must verify.
9. Two ranks: one epoch of the daemon with dist.nproc_per_node 2 against plain_ddp.py under
   torchrun (DDP, gloo, no checkpoints; one thread per rank on both sides); the agreement's cost,
   from `plain_ddp.py --agreement` (two copies of the model train the same batches in alternating
   blocks in one process, one carrying the daemon's agreement: its extra time over the plain
   copy's, on the costlier rank); peak RSS per rank (VmHWM); a SIGTERM to the daemon's launcher
   50 steps in until rank 0's emergency checkpoint is durable, against 2 steps (the agreement acts
   at most two step boundaries after a signal) + 1.25 × a raw save of that checkpoint.
10. The save budget: (d budget 1%, 2%, 5%), the daemon with checkpoint.max_overhead 0.01, 0.02,
   0.05 in the throughput rotation; the overhead measured, each epoch's seconds against (c)'s of
   the same repetition (whose only save is the epoch's), beside the interval the run chose (its
   last `save_policy` event), the save cost and step time it measured, the overhead it expected,
   and its periodic saves; the target: the overhead measured within the budget + 0.5 point.

Writes bench/results/latest.json and prints a table with a PASS/FAIL per target; with
`--update-docs`, writes the tables into docs/benchmark.md too, between its `bench:` markers.
The code: processes.py launches and reaps the contenders (through daemon/ops/child.py, the one
reader of the event stream), scenarios.py runs the measurements, report.py turns the samples
into figures, targets and tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.report import (
    DOCS,
    RESULTS,
    as_markdown,
    as_text,
    cpu_ticks,
    provenance,
    run_info,
    summarize,
    tables,
    update_docs,
)
from bench.scenarios import FULL, QUICK, Bench, Plan
from daemon.builtin.mnist_files import prepare_mnist


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="The benchmark (docs/benchmark.md).")
    parser.add_argument("--quick", action="store_true", help="a smoke check: one repetition, fewer saves")
    parser.add_argument("--reps", type=int, help="repetitions of the MLP measurements")
    parser.add_argument("--big-reps", type=int, help="repetitions of the 100M-parameter measurements")
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/benchmark.md too")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()), help="room for ~5 GB of checkpoints"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    plan = Plan(**{**plan.__dict__, **{k: v for k, v in (("reps", args.reps), ("big_reps", args.big_reps)) if v}})

    started, ticks = time.time(), cpu_ticks()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trainer-bench-", dir=args.workdir))
    try:
        prepare_mnist(work / "data", download=False)
        bench = Bench(plan, work)
        bench.run(lambda message: print(f"[{time.time() - started:6.1f} s] {message}", file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures, checks = summarize(bench.samples)
    info = run_info("bench.run", started, ticks, plan)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**info, "figures": figures, "targets": checks, "samples": bench.samples}, indent=2))
    print("\n\n".join([provenance(info), *map(as_text, tables(figures, checks))]))
    if args.update_docs:
        update_docs("\n\n".join([provenance(info), *map(as_markdown, tables(figures, checks))]))
    print(f"\nwritten: {args.out}" + (f" and {DOCS.relative_to(DOCS.parents[1])}" if args.update_docs else ""))
    return 0 if all(check["pass"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
