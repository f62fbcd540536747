"""The evaluation's files in the run folder: results.json, a table and a before/after bar chart.

`rows` are plain dicts, one per thing measured:
{"name": "your questions", "metric": "contains-match", "before": 0.2, "after": 0.8,
 "history": [[step, value], ...]}; "after" is the latest value measured with the LoRA.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_bytes, atomic_write_text

EVAL_DIR = "eval"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def change(row: dict[str, Any]) -> float | None:
    if row.get("before") is None or row.get("after") is None:
        return None
    return row["after"] - row["before"]


def table_markdown(rows: list[dict[str, Any]], step: int | None = None) -> str:
    """| what | metric | base | LoRA | change |: gains on one's own questions, losses elsewhere."""
    if not rows:
        return ""
    lora = "LoRA" if not step else f"LoRA (step {step})"  # step 0: only the base is measured yet
    lines = [f"| what | metric | base (before) | {lora} | change |", "|---|---|---|---|---|"]
    for row in rows:
        delta = change(row)
        shown = "-" if delta is None else f"{100 * delta:+.1f} pts"
        lines.append(f"| {row['name']} | {row['metric']} | {_pct(row.get('before'))} | {_pct(row.get('after'))} "
                     f"| {shown} |")
    return "\n".join(lines)


def before_after_figure(rows: list[dict[str, Any]], title: str = "Before and after training"):
    """Grouped bars: the base's score and the LoRA's, per thing measured (percent)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 120)  # room for the legend above a 100% bar
    ax.grid(axis="y", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "The evaluation appears here once the base is scored.", ha="center", va="center",
                transform=ax.transAxes, color="#6b7280")
        return fig
    names = [row["name"] for row in rows]
    places = list(range(len(rows)))
    width = 0.38
    before = [100 * (row.get("before") or 0.0) for row in rows]
    after = [100 * (row.get("after") or 0.0) for row in rows]
    bars_b = ax.bar([p - width / 2 for p in places], before, width, color="#9ca3af", label="base (before)")
    bars_a = ax.bar([p + width / 2 for p in places], after, width, color="#1d4ed8", label="LoRA (after)")
    for bars, values, rows_known in ((bars_b, before, [r.get("before") for r in rows]),
                                     (bars_a, after, [r.get("after") for r in rows])):
        for bar, value, known in zip(bars, values, rows_known):
            if known is not None:
                ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                            va="bottom", fontsize=8)
    ax.set_xticks(places, names, fontsize=8)
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    return fig


def write_report(out: Path, results: dict[str, Any]) -> dict[str, Path]:
    """results.json, table.md and before_after.png under out/eval/; returns their paths."""
    import io

    folder = Path(out) / EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"results": folder / "results.json", "table": folder / "table.md", "chart": folder / "before_after.png"}
    atomic_write_text(paths["results"], json.dumps(results, indent=1, ensure_ascii=False))
    atomic_write_text(paths["table"], table_markdown(results["rows"], results.get("step")) + "\n")
    buffer = io.BytesIO()
    before_after_figure(results["rows"]).savefig(buffer, format="png")
    atomic_write_bytes(paths["chart"], buffer.getvalue())
    return paths


def read_results(out: Path) -> dict[str, Any] | None:
    path = Path(out) / EVAL_DIR / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
