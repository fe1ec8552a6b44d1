"""`trainer plot`: the metrics history of one run or several, drawn to a PNG.

Top: the training loss (the epoch's mean so far, as recorded every `log.metrics_every_steps`)
against the global step, each resume a dashed line and each emergency, on-demand or notice
checkpoint a mark. Bottom: the headline metric of each epoch's evaluation. Several runs are
overlaid: an interrupted run drawn over an unbroken one shows one curve. matplotlib is imported here only, so
that training's start-up does not pay for it.
"""

from __future__ import annotations

from pathlib import Path

from daemon.ckpt.history import HistoryReader
from daemon.ckpt.layout import HISTORY_FILE, UnusableFile
from daemon.errors import ConfigError

SIZE_INCHES, DPI = (10, 7), 100  # a 1000 x 700 PNG
MARKERS = {"emergency": "v", "on_demand": "^", "notice": "D"}


def plot(run_dirs: list[Path], out: Path) -> int:
    """Draw each directory's metrics history into `out`; the number of runs drawn."""
    runs = []
    for directory in run_dirs:
        try:
            records = list(HistoryReader(directory))  # each a checked record: the fields drawn are there
        except (UnusableFile, OSError) as exc:
            raise ConfigError(f"{directory}: its metrics history ({HISTORY_FILE}) cannot be read: {exc}") from None
        if not records:
            raise ConfigError(f"{directory}: no metrics history ({HISTORY_FILE}) to plot; is it a checkpoint.dir?")
        runs.append((directory, records))

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    figure, (loss_axes, metric_axes) = pyplot.subplots(2, 1, figsize=SIZE_INCHES, dpi=DPI, sharex=False)
    headlines = set()
    for index, (directory, records) in enumerate(runs):
        color = f"C{index}"
        label = directory.name if len(set(d.name for d, _ in runs)) == len(runs) else str(directory)
        train = [r for r in records if r["record"] == "train"]
        # Wider and fainter for the runs drawn first: a later run drawn over an equal one leaves it visible.
        width = 1.5 + 2.5 * (len(runs) - 1 - index)
        loss_axes.plot(
            [r["global_step"] for r in train], [r["loss"] for r in train], color=color, lw=width, alpha=0.8, label=label
        )
        for r in records:
            if r["record"] == "resume":
                loss_axes.axvline(r["global_step"], color=color, ls="--", lw=1)
                loss_axes.annotate(
                    f"resumed ({r['kind']})",
                    (r["global_step"], 1),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=8,
                    color=color,
                )
            elif r["record"] == "checkpoint":
                loss = next((t["loss"] for t in reversed(train) if t["global_step"] <= r["global_step"]), None)
                if loss is not None:
                    loss_axes.plot(
                        r["global_step"],
                        loss,
                        MARKERS.get(r["kind"], "o"),
                        color="black",
                        ms=9,
                        label=f"{r['kind']} checkpoint ({label})",
                    )
        evals = [r for r in records if r["record"] == "eval"]
        for r in evals:
            headlines.add(r["headline"])
        metric_axes.plot(
            [r["epoch"] for r in evals],
            [r[r["headline"]] for r in evals],
            "o-",
            color=color,
            lw=width,
            alpha=0.8,
            label=label,
        )
    loss_axes.set(xlabel="global step", ylabel="training loss (epoch mean so far)", title="Training loss")
    metric_axes.set(xlabel="epoch", ylabel=" / ".join(sorted(headlines)), title="Evaluation after each epoch")
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    pyplot.close(figure)
    return len(runs)
