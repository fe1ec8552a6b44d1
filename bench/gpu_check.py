"""The GPU check: every CUDA path of the daemon run once on a GPU machine, in under 10 minutes, with
one JSON of every figure (`python -m bench.gpu_check --out gpu-check.json`).

    verify        `trainer verify` (two runs bitwise equal, a stop and resume equal to them) in fp32,
                  bf16 and fp16 (fp16's GradScaler state checkpointed); strict determinism is on
    ddp           ranks over NCCL (2 when the machine has 2 GPUs, else 1): a SIGTERM to rank 0 once a
                  checkpoint is durable, the resume, and the final state against an unbroken run
    fsdp          the same with dist.strategy: fsdp (2 GPUs only)
    speed         the daemon's s/epoch against a plain loop of the same MLP on the same GPU
    stop          the ~100M-parameter MLP: SIGTERM until its emergency checkpoint is durable

`--dry-run` does the same steps on the CPU (gloo, 2 ranks, a small model, fewer steps; fp16, which
needs CUDA, recorded as skipped), so that CI runs it and it cannot rot. Each step's failure is
recorded in the JSON (`error`) and the others still run; the exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BIG_MODEL = [5600, 5600, 5600, 5600]  # ~100M parameters (docs/configuration.md, model.hidden)


class Check:
    """One machine's settings for the steps: the GPU's, or the CPU's for a dry run."""

    def __init__(self, dry_run: bool, workdir: Path, data_root: Path) -> None:
        import torch

        self.dry_run = dry_run
        self.workdir = workdir
        self.data_root = data_root
        self.gpus = 0 if dry_run else torch.cuda.device_count()
        self.device = "cpu" if dry_run else "cuda"
        self.ranks = 2 if dry_run else min(self.gpus, 2)
        self.backend = "gloo" if dry_run else "nccl"

    def config(self, name: str, **settings: Any) -> Path:
        """A run's config under workdir/name: a small MNIST run on this machine's device."""
        base = {
            "data.root": str(self.data_root),
            "data.train_subset": 2000 if self.dry_run else 20000,
            "data.test_subset": 500,
            "train.epochs": 2,
            "train.device": self.device,
            "train.deterministic": True,
            "train.cpu_wait": "bounded",
            "checkpoint.every_seconds": 0,
            "checkpoint.every_steps": 5,
            "checkpoint.keep_last": 50,
            "checkpoint.dir": str(self.workdir / name / "checkpoints"),
            "log.format": "json",
        }
        tree: dict = {}
        for key, value in {**base, **settings}.items():
            section, field = key.split(".", 1)
            tree.setdefault(section, {})[field] = value
        (self.workdir / name).mkdir(parents=True, exist_ok=True)
        path = self.workdir / name / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path


def trainer(command: str, config: Path, *args: str):
    from daemon.ops.child import TrainerChild

    return TrainerChild.cli(command, "--config", str(config), *args, cwd=config.parent)


def run_to_end(config: Path) -> float:
    started = time.monotonic()
    process = trainer("run", config)
    code = process.wait(silence=300)
    if code != 0:
        raise RuntimeError(f"{config}: exit {code}\n{process.output()[-4000:]}")
    return time.monotonic() - started


def final_state(config: Path) -> dict:
    """The final checkpoint as one state (a sharded one's shards joined into whole tensors)."""
    from daemon.ckpt.sharded import read_sharded
    from daemon.ckpt.store import read_checkpoint

    directory = config.parent / "checkpoints"
    files = sorted(directory.glob("ckpt-*-final.pt"))
    if files:
        return read_checkpoint(files[-1])
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    newest = sorted(directory.glob("ckpt-*-final.dcp"))[-1]
    state, _ = read_sharded(newest)
    whole = config.parent / "shards.pt"
    dcp_to_torch_save(newest, whole)
    return {**state, "shards": torch.load(whole, weights_only=True)}


def verify(check: Check) -> dict:
    figures: dict[str, Any] = {}
    steps = "30" if check.dry_run else "200"
    for precision in ("fp32", "bf16", "fp16"):
        if precision == "fp16" and check.dry_run:
            figures[precision] = {"skipped": "fp16 needs CUDA"}
            continue
        process = trainer(
            "verify", check.config(f"verify-{precision}", **{"train.precision": precision}), "--steps", steps, "--json"
        )
        code = process.wait(silence=300)
        lines = process.output().splitlines()
        start = max((i for i, line in enumerate(lines) if line == "{"), default=None)  # the report, printed last
        report = json.loads("\n".join(lines[start:])) if start is not None else None
        figures[precision] = {"exit_code": code, "report": report}
    return figures


def stop_and_resume(check: Check, name: str, **settings: Any) -> dict:
    """An unbroken run, and one stopped by SIGTERM to rank 0 once a checkpoint is durable and
    resumed: their final states bitwise equal."""
    from daemon.ops.verify import first_difference

    settings = {"dist.nproc_per_node": check.ranks, "dist.backend": check.backend, **settings}
    unbroken = check.config(f"{name}-unbroken", **settings)
    unbroken_s = run_to_end(unbroken)
    stopped = check.config(f"{name}-stopped", **settings)
    process = trainer("run", stopped)
    pids = process.wait_for("ranks_started")["pids"]
    process.wait_for("checkpoint_saved", checkpoint_global_step=10, rank=0)
    os.kill(pids[0], signal.SIGTERM)
    stop_code = process.wait(silence=300)
    resumed_s = run_to_end(stopped)
    difference = first_difference(final_state(stopped), final_state(unbroken))
    return {
        "ranks": check.ranks,
        "backend": check.backend,
        "unbroken_s": round(unbroken_s, 2),
        "stop_exit_code": stop_code,
        "stopped_at_step": [e["global_step"] for e in process.events("stopped")],
        "resumed_s": round(resumed_s, 2),
        "bitwise_equal": difference is None,
        "first_difference": difference,
    }


def ddp(check: Check) -> dict:
    return stop_and_resume(check, "ddp")


def fsdp(check: Check) -> dict:
    if not check.dry_run and check.gpus < 2:
        return {"skipped": f"{check.gpus} GPU(s): FSDP needs 2"}
    return stop_and_resume(check, "fsdp", **{"dist.strategy": "fsdp"})


def speed(check: Check) -> dict:
    """s/epoch of the daemon (one process, full MNIST unless a dry run) and of a plain loop of the
    same MLP and batches on the same device, data preloaded there."""
    subset = 2000 if check.dry_run else None
    config = check.config("speed", **{"data.train_subset": subset, "train.epochs": 1, "checkpoint.every_steps": 0})
    process = trainer("run", config)
    if process.wait(silence=300) != 0:
        raise RuntimeError(process.output()[-4000:])
    (completed,) = process.events("epoch_completed")
    import torch

    return {
        "daemon_s_per_epoch": completed["seconds"],
        "plain_s_per_epoch": round(plain_epoch(check, subset), 3),
        # On a loaded CPU the plain loop's OpenMP threads spin against each other (the daemon's
        # waiting policy avoids it): a dry run's plain figure says little; a GPU's is the one to read.
        "plain_cpu_threads": torch.get_num_threads(),
    }


def plain_epoch(check: Check, subset: int | None) -> float:
    import torch

    from bench.common import BATCH_SIZE, hidden_widths, mlp, train_step
    from bench.plain_loop import as_float, read_idx

    raw = check.data_root / "MNIST" / "raw"
    device = torch.device(check.device)
    images = read_idx(raw / "train-images-idx3-ubyte", 16).view(-1, 28 * 28)[:subset].to(device)
    labels = read_idx(raw / "train-labels-idx1-ubyte", 8).long()[:subset].to(device)
    torch.manual_seed(0)
    model = mlp(hidden_widths("500")).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(labels), device=device)
    started = time.monotonic()
    for start in range(0, len(order), BATCH_SIZE):
        index = order[start : start + BATCH_SIZE]
        train_step(model, optimizer, as_float(images.index_select(0, index)), labels.index_select(0, index))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.monotonic() - started


def stop(check: Check) -> dict:
    """SIGTERM to a run of the ~100M-parameter MLP (a small one in a dry run) once it trains, until
    its emergency checkpoint is durable."""
    from daemon.ops.child import event_time

    hidden = [64, 64] if check.dry_run else BIG_MODEL
    config = check.config("stop", **{"model.hidden": hidden, "train.epochs": 1_000_000, "checkpoint.every_steps": 0})
    process = trainer("run", config)
    process.wait_for("progress", silence=300)
    sent = process.signal(signal.SIGTERM)
    saved = process.wait_for("checkpoint_saved", silence=300)
    code = process.wait(silence=300)
    return {
        "hidden": hidden,
        "exit_code": code,
        "bytes": saved["bytes"],
        "save_ms": saved["duration_ms"],
        "signal_to_durable_s": round(event_time(saved) - sent, 3),
    }


STEPS: dict[str, Callable[[Check], dict]] = {"verify": verify, "ddp": ddp, "fsdp": fsdp, "speed": speed, "stop": stop}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU (CI)")
    parser.add_argument("--out", default="gpu-check.json", help="where the JSON of every figure goes")
    parser.add_argument("--data-root", default=str(REPO / "data"), help="the directory holding MNIST/raw/")
    parser.add_argument("--only", nargs="*", choices=sorted(STEPS), help="these steps only")
    args = parser.parse_args()

    import torch

    from daemon.builtin.mnist_files import prepare_mnist

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run it on a GPU machine, or with --dry-run", file=sys.stderr)
        return 2
    prepare_mnist(Path(args.data_root), download=False)
    results: dict[str, Any] = {
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not args.dry_run else [],
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        check = Check(args.dry_run, Path(workdir), Path(args.data_root))
        for name in args.only or STEPS:
            started = time.monotonic()
            try:
                results[name] = STEPS[name](check)
            except Exception:  # noqa: BLE001 -- one step's failure is a figure; the others still run
                results[name] = {"error": traceback.format_exc()[-4000:]}
                failed = True
            results[name]["step_s"] = round(time.monotonic() - started, 1)
            print(f"{name}: {json.dumps(results[name])[:300]}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
