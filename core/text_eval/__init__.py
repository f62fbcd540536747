"""Evaluation of a text LoRA: what it gained on the user's own questions, what it lost elsewhere.

- `heldout`: the user's held-out questions with answers (exact or contains match);
- `harness`: lm-eval-harness tasks (the `lm-eval` library), refused offline when their data is missing;
- `report`: the before/after table and bar chart in the run folder;
- `suite`: runs both on the base (adapter off) before training and on the adapter during and after.
"""
