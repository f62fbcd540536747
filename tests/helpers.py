"""Reading what a run leaves in its output folder, the one way every test reads it."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

LOSS_CSV_HEADER = ["step", "loss", "lr", "val_loss"]


@dataclass(frozen=True)
class LossRow:
    """One line of loss.csv: the optimizer step, its loss, its learning rate and, on the steps that
    measured one, the validation loss."""

    step: int
    loss: float
    lr: float
    val_loss: float | None = None


def read_loss_csv(output_dir: str | Path) -> list[LossRow]:
    """The rows of `output_dir/loss.csv` (written by the run log: `step,loss,lr,val_loss`, one line per logged step).

    Fails with the line at fault when the file is not whole: a wrong header, or a row that is cut
    short or does not parse, which is what a user's spreadsheet or plot would trip over.
    """
    path = Path(output_dir) / "loss.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines and lines[0] == LOSS_CSV_HEADER, f"{path}: header {lines[:1]}, expected {LOSS_CSV_HEADER}"
    rows = []
    for number, fields in enumerate(lines[1:], start=2):
        assert len(fields) == len(LOSS_CSV_HEADER), f"{path}, line {number}: {fields}"
        try:
            rows.append(LossRow(int(fields[0]), float(fields[1]), float(fields[2]),
                                float(fields[3]) if fields[3] else None))
        except ValueError:
            raise AssertionError(f"{path}, line {number}: {fields} does not parse as step,loss,lr,val_loss") from None
    return rows
