"""The live loss plot: raw loss, smoothed loss, validation loss and learning rate against the step.

Pure functions over the `losses` list of a JobSnapshot ([(step, loss, smoothed, lr, validation)]),
so the plot can be tested without a browser. matplotlib loads on the first plot only
and draws with the Agg backend (no display needed).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

LossRow = tuple  # (step, loss, smoothed | None, lr | None[, validation loss | None])


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, for runs whose events carry no smoothed loss."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta ** i))
    return out


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def loss_csv_rows(path: str | Path) -> list[LossRow]:
    """A run's loss.csv (step,loss,lr,val_loss) as plot rows; [] when it is missing or unreadable."""
    rows: list[LossRow] = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for record in csv.DictReader(handle):
                step, loss = _number(record.get("step")), _number(record.get("loss"))
                if step is not None and loss is not None:
                    rows.append((int(step), loss, None, _number(record.get("lr")), _number(record.get("val_loss"))))
    except OSError:
        return []
    return rows


def with_history(earlier: Sequence[LossRow], losses: Sequence[LossRow]) -> list[LossRow]:
    """A resumed run's curve: the rows loss.csv holds from before this process's first step, then its own."""
    first = losses[0][0] if losses else float("inf")
    return [row for row in earlier if row[0] < first] + list(losses)


def loss_series(losses: Sequence[LossRow]) -> dict[str, list[float]]:
    """Split rows into finite series; a missing smoothed value is filled with our own EMA."""
    rows = [r for r in losses if r[1] is not None and math.isfinite(r[1])]
    steps = [float(r[0]) for r in rows]
    raw = [float(r[1]) for r in rows]
    smoothed_given = [r[2] for r in rows]
    if rows and all(s is not None and math.isfinite(s) for s in smoothed_given):
        smoothed = [float(s) for s in smoothed_given]  # type: ignore[arg-type]
    else:
        smoothed = ema(raw)
    lr_rows = [(float(r[0]), float(r[3])) for r in rows if r[3] is not None and math.isfinite(r[3])]
    val_rows = [(float(r[0]), float(r[4])) for r in rows
                if len(r) > 4 and r[4] is not None and math.isfinite(r[4])]
    return {"step": steps, "loss": raw, "smoothed": smoothed,
            "lr_step": [s for s, _ in lr_rows], "lr": [v for _, v in lr_rows],
            "val_step": [s for s, _ in val_rows], "val": [v for _, v in val_rows]}


def loss_figure(losses: Sequence[LossRow], title: str = "Training loss",
                rewards: Sequence[tuple[int, float]] = ()):
    """A matplotlib Figure: raw loss (thin), smoothed loss (bold), validation loss (dots), learning rate
    (right axis); with `rewards` (GRPO: (step, mean reward)) a second panel beside the loss draws them."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    data = loss_series(losses)
    fig = Figure(figsize=(7, 2.8), dpi=100, layout="constrained")  # fits beside the form
    ax = fig.add_subplot(1, 2 if rewards else 1, 1)
    if rewards:
        _reward_panel(fig.add_subplot(1, 2, 2), rewards)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if not data["step"]:
        ax.text(0.5, 0.5, "The loss appears here after the first steps.", ha="center", va="center",
                transform=ax.transAxes, color="#6b7280")
        return fig
    ax.plot(data["step"], data["loss"], color="#93c5fd", linewidth=0.8, label="loss")
    ax.plot(data["step"], data["smoothed"], color="#1d4ed8", linewidth=2.0, label="smoothed")
    if data["val"]:
        # Fixed noise and noise levels: unlike the raw loss, successive points compare.
        ax.plot(data["val_step"], data["val"], color="#16a34a", linewidth=1.6, marker="o", markersize=3,
                label="validation")
    handles, labels = ax.get_legend_handles_labels()
    if data["lr"]:
        ax2 = ax.twinx()
        ax2.plot(data["lr_step"], data["lr"], color="#f59e0b", linewidth=1.2, linestyle="--",
                 label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    return fig


def _reward_panel(ax, rewards: Sequence[tuple[int, float]]) -> None:
    """GRPO's mean reward of each step's sampled answers (thin) and its moving average (bold)."""
    steps = [float(step) for step, _ in rewards]
    values = [float(value) for _, value in rewards]
    ax.set_title("Mean reward", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.plot(steps, values, color="#86efac", linewidth=0.8, label="reward")
    ax.plot(steps, ema(values), color="#15803d", linewidth=2.0, label="smoothed")
    ax.legend(loc="lower right", fontsize=8)
