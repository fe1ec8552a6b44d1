"""The benchmark's figures from its samples, the targets judged on them, and the tables (text,
and markdown for docs/benchmark.md)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import sys
import time

from bench.processes import REPO
from bench.scenarios import BUDGETS, CONTENDED, TASK, THROUGHPUT

DDP_EPOCHS = ("ddp_plain", "ddp_daemon")  # timed by the epoch; ddp_agreement is a measure of its own

RESULTS = REPO / "bench" / "results" / "latest.json"
DOCS = REPO / "docs" / "benchmark.md"  # the tables go between its markers
# The begin marker is found by its start (one written by an earlier version says another command)
# and written anew.
DOCS_BEGIN, DOCS_BEGIN_LINE = "<!-- bench:begin", "<!-- bench:begin: written by python -m bench.run --update-docs -->"
DOCS_END = "<!-- bench:end -->"
LABELS = {
    "a": "(a) plain loop, tensors, no checkpoint",
    "a_tuned": "(a tuned) the same, malloc tuned as the daemon's (the fair floor)",
    "c_active": "(c active) daemon, default policy, cpu_wait active",
    "b": "(b) seed recipe",
    "c": "(c) daemon, default policy",
    "d": "(d) daemon, every 50 steps (async)",
    "d_sync": "(d sync) daemon, every 50 steps (sync)",
    "c_1t": "(c 1 thread) daemon, default policy, train.cpu_threads 1",
    "d_1t": "(d 1 thread) daemon, every 50 steps (async), train.cpu_threads 1",
    **{
        contender: f"(d budget {budget:.0%}) daemon, checkpoint.max_overhead {budget}"
        for contender, budget in BUDGETS.items()
    },
}
BUDGET_SLACK = 0.005  # the target: the overhead measured within the budget, + half a point


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(samples: dict[str, list]) -> tuple[dict, list[dict]]:
    def med(key: str) -> float:
        return statistics.median(samples[key])

    def field(key: str, name: str) -> list[float]:
        return [sample[name] for sample in samples[key]]

    figures: dict = {"throughput": {}, "emergency": {}, "restart": {}, "stall": {}, "memory": {}}
    for contender in THROUGHPUT:
        seconds = samples[f"throughput.{contender}.seconds"]
        figures["throughput"][contender] = {
            "seconds_per_epoch": spread(seconds),
            "steps_per_s": spread([600 / s for s in seconds]),
        }

    def paired(numerator: str, denominator: str) -> dict:
        return spread(paired_values(samples, numerator, denominator))

    ratios = {
        "(c)/(a tuned)": paired("c", "a_tuned"),
        "(d)/(a tuned)": paired("d", "a_tuned"),
        "(d sync)/(a tuned)": paired("d_sync", "a_tuned"),
        "(c)/(a)": paired("c", "a"),
        "(c)/(c active)": paired("c", "c_active"),
        "(b)/(c)": paired("b", "c"),
        "(d)/(c): the saves' cost, the training's threads on every core": paired("d", "c"),
        "(d 1 thread)/(c 1 thread): the saves' cost, a core left to the writer": paired("d_1t", "c_1t"),
    }
    figures["throughput"]["ratios"] = ratios
    # The overhead measured: the epoch's seconds against (c)'s in the same repetition, whose only
    # save is the epoch's; beside it, the interval the run chose and the overhead it expected.
    policy_fields = ("interval_steps", "interval_s", "save_ms", "step_ms", "overhead", "periodic_saves")
    figures["budget"] = {
        contender: {
            "max_overhead": budget,
            "measured_overhead": spread([ratio - 1 for ratio in paired_values(samples, contender, "c")]),
            **{f"policy_{name}": spread(field(f"budget.{contender}", name)) for name in policy_fields},
        }
        for contender, budget in BUDGETS.items()
    }
    figures["contended"] = {
        contender: {name: spread(field(f"contended.{contender}", name)) for name in ("quiet_s", "busy_s", "share")}
        for contender in CONTENDED
    }
    task = {contender: samples[f"task.{contender}.seconds"] for contender in TASK}
    figures["task"] = {
        **{contender: spread(seconds) for contender, seconds in task.items()},
        "ratio": spread([d / p for d, p in zip(task["cnn_daemon"], task["cnn_plain"], strict=False)]),
    }

    steps = {"mlp": 1 / med("throughput.c.train_steps_per_s"), "big": med("big.step_s")}
    for name, model in (("mlp", "mlp"), ("big", "big"), ("big_writer_busy", "big")):
        figures["emergency"][name] = {
            "durable_s": spread(field(f"emergency.{name}", "durable_s")),
            "exit_s": spread(field(f"emergency.{name}", "exit_s")),
            "waited_ms": spread(field(f"emergency.{name}", "waited_ms")),
            "save_ms": spread(field(f"emergency.{name}", "save_ms")),
            "step_s": steps[model],
            "raw_save_s": spread(samples[f"raw_save.{model}_s"]),
            "budget_s": steps[model] + 1.25 * med(f"raw_save.{model}_s"),
        }
    for name in ("daemon_fresh", "daemon_resume", "seed_fresh", "seed_resume"):
        figures["restart"][name] = spread(samples[f"restart.{name}"])
    for key in ("mlp.async", "mlp.sync", "big.async_first", "big.async", "big.sync"):
        figures["stall"][key] = spread(samples[f"stall.{key}_ms"])
    for name in ("a", "a_tuned", "b", "c", "c_active", "d", "d_sync", "big_plain", "big_async", "big_sync"):
        figures["memory"][name] = spread(samples[f"memory.{name}.max_rss"])
    snapshot = {"mlp": med("checkpoint.d.bytes"), "big": med("checkpoint.big.bytes")}
    figures["memory"]["snapshot_bytes"] = snapshot

    rss_limit = {
        "mlp": (1.1 * med("memory.a.max_rss") + snapshot["mlp"]) / 1e6,
        "big": (1.1 * med("memory.big_plain.max_rss") + snapshot["big"]) / 1e6,
    }
    emergency = figures["emergency"]
    targets = [
        ("(c)/(a tuned) s/epoch", ratios["(c)/(a tuned)"]["median"], "<=", 1.03),
        ("(d)/(a tuned) s/epoch", ratios["(d)/(a tuned)"]["median"], "<=", 1.05),
        ("(b)/(c) s/epoch", ratios["(b)/(c)"]["median"], ">=", 2.0),
        (
            "(c)/(c active) s/epoch, quiet: cpu_wait against libgomp's default",
            ratios["(c)/(c active)"]["median"],
            "<=",
            1.03,
        ),
        (
            "(c) beside busy loops: share of its quiet throughput",
            figures["contended"]["c"]["share"]["median"],
            ">=",
            0.35,
        ),
        (
            "MLP SIGTERM → durable, s (step + 1.25 × raw)",
            emergency["mlp"]["durable_s"]["median"],
            "<=",
            emergency["mlp"]["budget_s"],
        ),
        (
            "100M SIGTERM → durable, s (step + 1.25 × raw)",
            emergency["big"]["durable_s"]["median"],
            "<=",
            emergency["big"]["budget_s"],
        ),
        ("MLP SIGTERM → exit, s", emergency["mlp"]["exit_s"]["median"], "<", 1.0),
        (
            "launch → first resumed step, s (1.1 × seed's)",
            med("restart.daemon_resume"),
            "<=",
            1.1 * med("restart.seed_fresh"),
        ),
        ("100M async stall / sync save", med("stall.big.async_ms") / med("stall.big.sync_ms"), "<=", 0.15),
        ("peak RSS, MLP daemon (c), MB", med("memory.c.max_rss") / 1e6, "<=", rss_limit["mlp"]),
        ("peak RSS, MLP daemon (d), MB", med("memory.d.max_rss") / 1e6, "<=", rss_limit["mlp"]),
        ("peak RSS, 100M daemon async, MB", med("memory.big_async.max_rss") / 1e6, "<=", rss_limit["big"]),
    ]
    sigkill = samples["durability.sigkill"][0]
    figures["durability"] = sigkill
    # nan (a FAIL) when no SIGKILL landed inside a write: the check proved nothing
    invalid = sigkill["checkpoints"] - sigkill["valid"] if sigkill["write_cut_short"] else math.nan
    targets.append(("invalid checkpoints after SIGKILL inside a background write", invalid, "<=", 0))
    targets.append(("example CNN: daemon / its plain loop, s/epoch", figures["task"]["ratio"]["median"], "<=", 1.10))
    ddp = figures["ddp"] = several_ranks(samples)
    targets += [
        ("2 ranks: daemon / plain DDP, s/epoch", ddp["ratio"]["median"], "<=", 1.05),
        ("2 ranks: the agreement's cost, % of plain DDP's time", ddp["agreement_percent"]["median"], "<=", 2.0),
        (
            "2 ranks: peak RSS per rank, MB (1.1 × plain's + one snapshot)",
            ddp["rss_mb"]["ddp_daemon"],
            "<=",
            ddp["rss_limit_mb"],
        ),
        ("2 ranks: SIGTERM → durable, s (2 steps + 1.25 × raw)", ddp["durable_s"]["median"], "<=", ddp["budget_s"]),
    ]
    targets += [
        (
            f"{LABELS[contender]}: overhead measured against (c), + {BUDGET_SLACK:.1%} allowed",
            figures["budget"][contender]["measured_overhead"]["median"],
            "<=",
            budget + BUDGET_SLACK,
        )
        for contender, budget in BUDGETS.items()
    ]
    passed = {"<=": lambda v, limit: v <= limit, "<": lambda v, limit: v < limit, ">=": lambda v, limit: v >= limit}
    checks = [
        {"target": name, "value": value, "op": op, "limit": limit, "pass": passed[op](value, limit)}
        for name, value, op, limit in targets
    ]
    return figures, checks


def paired_values(samples: dict[str, list], numerator: str, denominator: str) -> list[float]:
    """The ratio within each repetition, whose contenders ran within a minute of each other:
    the machine's slow swings cancel better than in a ratio of medians over the whole run."""
    over = zip(samples[f"throughput.{numerator}.seconds"], samples[f"throughput.{denominator}.seconds"], strict=False)
    return [n / d for n, d in over]


def several_ranks(samples: dict[str, list]) -> dict:
    seconds = {contender: samples[f"ddp.{contender}.seconds"] for contender in DDP_EPOCHS}
    stops = samples["ddp.stop"]
    step_s = statistics.median(stop["step_s"] for stop in stops)
    raw_s = statistics.median(samples["raw_save.ddp_s"])
    plain_rss = max(samples["ddp.ddp_plain.max_rss"])
    return {
        **{contender: spread(values) for contender, values in seconds.items()},
        "ratio": spread([d / p for d, p in zip(seconds["ddp_daemon"], seconds["ddp_plain"], strict=False)]),
        "agreement_percent": spread(samples["ddp.agreement_percent"]),
        "rss_mb": {contender: max(samples[f"ddp.{contender}.max_rss"]) / 1e6 for contender in DDP_EPOCHS},
        "rss_limit_mb": (1.1 * plain_rss + statistics.median(stop["bytes"] for stop in stops)) / 1e6,
        "durable_s": spread([stop["durable_s"] for stop in stops]),
        "step_s": step_s,
        "raw_save_s": spread(samples["raw_save.ddp_s"]),
        "budget_s": 2 * step_s + 1.25 * raw_s,
    }


# -- output --------------------------------------------------------------------------------

Table = tuple[str, list[str], list[list[str]]]  # title, column headers, rows


def mmm(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    """median (min–max)"""
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def tables(figures: dict, checks: list[dict]) -> list[Table]:
    throughput = [
        [
            LABELS[c],
            mmm(figures["throughput"][c]["seconds_per_epoch"], digits=2),
            f"{figures['throughput'][c]['steps_per_s']['median']:.0f}",
        ]
        for c in THROUGHPUT
    ]
    throughput += [[f"ratio {name}", mmm(value), ""] for name, value in figures["throughput"]["ratios"].items()]
    emergency_labels = {
        "mlp": "MLP",
        "big": "100M, writer idle",
        "big_writer_busy": "100M, during a background save (waits for it)",
    }
    emergency = [
        [
            label,
            mmm(e["durable_s"]),
            mmm(e["exit_s"]),
            f"{e['step_s']:.3f}",
            mmm(e["raw_save_s"]),
            f"{e['budget_s']:.3f}",
        ]
        for name, label in emergency_labels.items()
        for e in [figures["emergency"][name]]
    ]
    restart_labels = {
        "daemon_fresh": "daemon, fresh",
        "daemon_resume": "daemon, resumed",
        "seed_fresh": "seed recipe, fresh",
        "seed_resume": "seed recipe, resumed",
    }
    restart = [[label, mmm(figures["restart"][name], digits=2)] for name, label in restart_labels.items()]
    stall = figures["stall"]
    stalls = [
        ["MLP (every 50 steps)", mmm(stall["mlp.async"], digits=1), mmm(stall["mlp.sync"], digits=1)],
        ["100M, first save of a process (allocates the snapshot)", mmm(stall["big.async_first"], digits=0), ""],
        ["100M, later saves", mmm(stall["big.async"], digits=0), mmm(stall["big.sync"], digits=0)],
    ]
    memory_labels = {
        "a": "(a) plain loop, MLP", "a_tuned": "(a tuned) plain loop, malloc tuned", "b": "(b) seed recipe",
        "c": "(c) daemon, default policy", "c_active": "(c active) daemon, cpu_wait active",
        "d": "(d) daemon, every 50 steps (async)", "d_sync": "(d sync) daemon, every 50 steps (sync)",
        "big_plain": "plain loop, 100M", "big_async": "daemon 100M, async saves", "big_sync": "daemon 100M, sync saves",
    }  # fmt: skip
    memory = [[label, mmm(figures["memory"][name], 1e-6, 0)] for name, label in memory_labels.items()]
    snapshot = figures["memory"]["snapshot_bytes"]
    memory.append(
        ["one snapshot (checkpoint size): MLP / 100M", f"{snapshot['mlp'] / 1e6:.1f} / {snapshot['big'] / 1e6:.0f}"]
    )
    verdicts = [
        [
            check["target"],
            f"{check['value']:.3f}",
            f"{check['op']} {check['limit']:.3f}",
            "PASS" if check["pass"] else "FAIL",
        ]
        for check in checks
    ]
    return [
        ("1. Throughput, one epoch (MNIST MLP, batch 100)", ["contender", "s/epoch", "steps/s"], throughput),
        (
            "2. Emergency checkpoint, s after SIGTERM",
            ["model", "durable", "exit", "one step", "raw save + fsync", "step + 1.25 × raw"],
            emergency,
        ),
        ("3. Restart, s from launch to the first completed step", ["process", "s"], restart),
        ("4. Periodic-save stall, ms the loop is blocked per save", ["model", "async", "sync"], stalls),
        ("5. Peak RSS, MB", ["process", "MB"], memory),
        (
            f"6. A shared machine: one epoch quiet, then beside {(os.cpu_count() or 1) + 1} busy loops",
            ["contender", "quiet s/epoch", "busy s/epoch", "share of quiet throughput"],
            [
                [LABELS[c], mmm(f["quiet_s"], digits=2), mmm(f["busy_s"], digits=2), mmm(f["share"], digits=2)]
                for c in CONTENDED
                for f in [figures["contended"][c]]
            ],
        ),
        (
            "7. A task of one's own: examples/mnist_cnn.py (augmentation in 2 workers), one epoch",
            ["contender", "s/epoch"],
            [
                ["daemon, examples/mnist_cnn.yaml", mmm(figures["task"]["cnn_daemon"], digits=1)],
                ["plain loop for the same CNN (bench/plain_cnn.py)", mmm(figures["task"]["cnn_plain"], digits=1)],
                ["ratio daemon / plain", mmm(figures["task"]["ratio"])],
            ],
        ),
        several_ranks_table(figures["ddp"]),
        budget_table(figures["budget"]),
        ("Targets (on medians)", ["target", "value", "limit", ""], verdicts),
    ]


def several_ranks_table(ddp: dict) -> Table:
    labels = {
        "ddp_daemon": "daemon, dist.nproc_per_node 2",
        "ddp_plain": "plain DDP under torchrun (bench/plain_ddp.py)",
    }
    rows = [[label, mmm(ddp[name], digits=2), f"{ddp['rss_mb'][name]:.0f}"] for name, label in labels.items()]
    rows += [
        ["ratio daemon / plain", mmm(ddp["ratio"]), ""],
        ["the agreement's cost, % of plain DDP's training time (side by side in one process)", mmm(ddp["agreement_percent"], digits=1), ""],
        [f"SIGTERM to the launcher → durable, s (a step {ddp['step_s'] * 1e3:.1f} ms, raw save "
         f"{mmm(ddp['raw_save_s'])})", mmm(ddp["durable_s"]), ""],
    ]  # fmt: skip
    return (
        "8. Two ranks (DDP, gloo, one thread each), one epoch of the MLP",
        ["contender", "s/epoch", "peak RSS per rank, MB"],
        rows,
    )


def budget_table(budget: dict) -> Table:
    rows = [
        [
            f"{b['max_overhead']:.0%}",
            mmm(b["measured_overhead"], 100, 1),
            mmm(b["policy_interval_steps"], digits=0),
            mmm(b["policy_interval_s"], digits=2),
            mmm(b["policy_save_ms"], digits=1),
            mmm(b["policy_step_ms"], digits=2),
            mmm(b["policy_overhead"], 100, 1),
            mmm(b["policy_periodic_saves"], digits=0),
        ]
        for b in budget.values()
    ]
    return (
        "9. The save budget (checkpoint.max_overhead), one epoch of the MLP: overhead measured against (c)",
        ["budget", "measured overhead, %", "interval, steps", "interval, s", "save cost, ms", "step, ms",
         "policy's own estimate, %", "periodic saves"],
        rows,
    )  # fmt: skip


def as_text(table: Table) -> str:
    title, headers, rows = table
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [title, "  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) for row in rows]
    return "\n".join(lines)


def as_markdown(table: Table) -> str:
    title, headers, rows = table
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_info(module: str, started: float, ticks: list[int], plan: object) -> dict:
    """Where and how a benchmark ran: its command, start, wall time, plan, machine and noise (the load
    at the end, the CPU steal since `ticks` were read at `started`)."""
    spent = [after - before for before, after in zip(ticks, cpu_ticks(), strict=False)]
    steal = spent[7] / max(sum(spent), 1)  # /proc/stat: user nice system idle iowait irq softirq steal
    return {
        "command": " ".join([".venv/bin/python", "-m", module, *sys.argv[1:]]),
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="minutes"),
        "wall_s": round(time.time() - started, 1),
        "plan": plan.__dict__,
        "machine": machine(),
        "noise": f"load average {os.getloadavg()[0]:.2f} at the end, CPU steal {steal:.1%} during the run",
    }


def provenance(info: dict) -> str:
    m = info["machine"]
    return (
        f"`{info['command']}`, {info['started']}, {info['wall_s']:.0f} s. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads); {info['noise']}. Figures: median (min–max) over the runs; a ratio's are over the repetitions, each within one."
    )


def update_docs(
    block: str, begin_marker: str = DOCS_BEGIN, begin_line: str = DOCS_BEGIN_LINE, end_marker: str = DOCS_END
) -> None:
    """`block` in place of what DOCS holds between a pair of markers: by default bench/run.py's;
    bench/remote.py passes its own. The begin marker is found by its start and written anew as
    `begin_line`."""
    text = DOCS.read_text()
    begin = text.index(begin_marker)
    after_begin, end = text.index("-->", begin) + len("-->"), text.index(end_marker)
    if not after_begin <= end:
        raise ValueError(f"{DOCS}: {end_marker} before {begin_marker}")
    DOCS.write_text(text[:begin] + begin_line + "\n" + block + "\n" + text[end:])


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def cpu_ticks() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(value) for value in stat.readline().split()[1:]]
